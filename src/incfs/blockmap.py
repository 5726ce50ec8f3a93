"""Per-file block presence and location, kept compact: 14 bytes per block
(10 for a map loaded from an index without CRCs).

A 64 GiB image has 16M blocks, so this is the structure that decides the
daemon's memory. Three parallel arrays, allocated on first use: the offset of
the stored bytes (8), the info word with kind and stored size (2) and the
CRC32 of the stored bytes (4). `ABSENT` in the info word marks a hole.

The arrays are sized by the file's *declared* size, which an image or a loader
may set to anything up to 2^63: a map starts sparse (a dict of present blocks)
and turns dense once 1/DENSE_AT of its blocks are present, so memory follows
the blocks actually stored, never the size a file claims.
"""

from __future__ import annotations

from array import array

ABSENT = 0xFFFF  # never a valid info word: bit 13 set means size > 8191
DENSE_AT = 16  # a sparse map turns dense once present * DENSE_AT >= count


class _Column:
    """One column (0 offset, 1 info, 2 crc) of a sparse map, indexable like
    the dense array it stands in for (the read path indexes them)."""

    __slots__ = ("cells", "field", "default")

    def __init__(self, cells: dict, field: int, default: int):
        self.cells, self.field, self.default = cells, field, default

    def __getitem__(self, index: int) -> int:
        cell = self.cells.get(index)
        return self.default if cell is None else cell[self.field]


class BlockMap:
    __slots__ = ("count", "present", "_offsets", "_infos", "_crcs")

    def __init__(self, count: int):
        self.count = count
        self.present = 0
        self._offsets: array | None = None
        self._infos: array | None = None
        self._crcs: array | None = None

    def _allocate(self) -> None:
        # Readers in other threads test `_infos` first: publish it last.
        if self.count > DENSE_AT:
            cells: dict[int, tuple[int, int, int]] = {}
            self._offsets, self._crcs = _Column(cells, 0, 0), _Column(cells, 2, 0)
            self._infos = _Column(cells, 1, ABSENT)
            return
        self._offsets = array("Q", bytes(8 * self.count))
        self._crcs = array("I", bytes(4 * self.count))
        self._infos = array("H", [ABSENT]) * self.count

    def _densify(self, cells: dict) -> None:
        """Swap a sparse map for arrays, built whole before they are published
        (a reader holding either form sees every block set so far)."""
        offsets = array("Q", bytes(8 * self.count))
        crcs = array("I", bytes(4 * self.count))
        infos = array("H", [ABSENT]) * self.count
        for index, (offset, info, crc) in list(cells.items()):
            offsets[index], infos[index], crcs[index] = offset, info, crc
        self._offsets, self._crcs = offsets, crcs
        self._infos = infos

    def _cells(self) -> dict | None:
        infos = self._infos
        return infos.cells if isinstance(infos, _Column) else None

    def get(self, index: int) -> tuple[int, int, int | None] | None:
        """(offset, info, crc) of a present block, None for a hole (and for
        the crc in a map loaded without CRCs)."""
        if self._infos is None or not 0 <= index < self.count:
            return None
        info = self._infos[index]
        if info == ABSENT:
            return None
        crcs = self._crcs
        return self._offsets[index], info, None if crcs is None else crcs[index]

    def arrays(self) -> tuple[array | None, array | None, array | None]:
        """The raw (offsets, infos, crcs) arrays, for the batched read path;
        all None while no block is present."""
        return self._offsets, self._infos, self._crcs

    def is_present(self, index: int) -> bool:
        return self._infos is not None and self._infos[index] != ABSENT

    def set(self, index: int, offset: int, info: int, crc: int, replace: bool = False) -> bool:
        """Record a block; False (and no change) when it was already present:
        a loaded block never changes, unless `replace` (a repair record)."""
        if self._infos is None:
            self._allocate()
        was_present = self._infos[index] != ABSENT
        if was_present and not replace:
            return False
        cells = self._cells()
        if cells is not None:
            cells[index] = (offset, info, crc)  # one store: atomic for readers
            self.present += 0 if was_present else 1
            if self.present * DENSE_AT >= self.count:
                self._densify(cells)
            return True
        # The info word marks presence, so it is written last: a reader in
        # another thread sees either a hole or a complete entry.
        if was_present:
            self._infos[index] = ABSENT  # readers see a hole while it changes
        self._offsets[index] = offset
        self._set_crc(index, crc)
        self._infos[index] = info
        self.present += 0 if was_present else 1
        return True

    def _set_crc(self, index: int, crc: int | None) -> None:
        # A map loaded without CRCs (format.maps RUN and RAW) belongs to a
        # file with a hash tree, which checks every block it serves: a CRC
        # given for a block stored later has nowhere to go and is not needed.
        if self._crcs is not None:
            self._crcs[index] = crc

    def move(self, index: int, offset: int, info: int, crc: int) -> None:
        """Say that a present block's bytes now live elsewhere (the same
        bytes: incfs.space). Unlike a replace, readers in other threads never
        see a hole meanwhile: they read the old place or the new one."""
        cells = self._cells()
        if cells is not None:
            cells[index] = (offset, info, crc)
            return
        self._offsets[index] = offset
        self._set_crc(index, crc)
        self._infos[index] = info

    def forget(self, index: int) -> bool:
        """Make a present block a hole again (in memory only): its stored
        bytes were found bad and it is to be fetched anew."""
        if self._infos is None or self._infos[index] == ABSENT:
            return False
        cells = self._cells()
        if cells is not None:
            del cells[index]
        else:
            self._infos[index] = ABSENT
        self.present -= 1
        return True

    @property
    def complete(self) -> bool:
        return self.present == self.count

    def missing(self, start: int, end: int) -> list[int]:
        """Indexes in [start, end) that are holes."""
        end = min(end, self.count)
        if self._infos is None:
            return list(range(start, end))
        infos = self._infos
        return [i for i in range(start, end) if infos[i] == ABSENT]

    def ranges(self) -> list[tuple[int, int]]:
        """Present blocks as half-open [start, end) ranges."""
        if self._infos is None or not self.present:
            return []
        out, start = [], None
        cells = self._cells()
        if cells is not None:
            for i in sorted(cells):
                if start is None or i != end:
                    if start is not None:
                        out.append((start, end))
                    start = i
                end = i + 1
            out.append((start, end))
            return out
        for i, info in enumerate(self._infos):
            if info != ABSENT and start is None:
                start = i
            elif info == ABSENT and start is not None:
                out.append((start, i))
                start = None
        if start is not None:
            out.append((start, self.count))
        return out

    def entries(self):
        """Yield (index, offset, info, crc) for every present block."""
        if self._infos is None:
            return
        cells = self._cells()
        if cells is not None:
            for i in sorted(cells):
                offset, info, crc = cells[i]
                yield i, offset, info, crc
            return
        crcs = self._crcs
        for i, info in enumerate(self._infos):
            if info != ABSENT:
                yield i, self._offsets[i], info, None if crcs is None else crcs[i]


def loaded_map(count: int, offsets: array, infos: array, crcs: array | None) -> BlockMap:
    """A dense map over columns read from an image index (ABSENT marks
    holes); `crcs` None for a map without them (its file's hash tree is
    the check), whose entries then give None for a CRC."""
    bm = BlockMap(count)
    if count:
        bm._offsets, bm._crcs = offsets, crcs
        bm._infos = infos
        bm.present = count - infos.count(ABSENT)
    return bm
