"""Where pack put every block: spool, offset in it, info word and CRC, kept
in parallel arrays (15 bytes a block) instead of a dict of tuples (about
300 bytes a block: a million one-block files cost 300 MB that way).

Blocks get slots as a file is packed: its data blocks first, then its hash
blocks, so a file's blocks are found from two numbers per file. Files are
known by the packer's file number until the tree is laid out; `number_inodes`
then maps inode numbers to file numbers, and lookups go by inode.
"""

from __future__ import annotations

from array import array
from typing import Iterator

from .format.maps import MapKind, choose_kind
from .format.records import TreeKind

SPOOLS = ("hash", "hot", "cold")
_CODE = {name: i for i, name in enumerate(SPOOLS)}
_EMPTY = -1  # a slot no block was placed in (read back as None: absent)

Where = tuple[str, int, int, int]  # (spool, offset in the spool, info, crc)


class Placements:
    def __init__(self) -> None:
        self.spool = array("b")
        self.offset = array("Q")
        self.info = array("H")
        self.crc = array("I")
        # per file number: first data slot, first hash slot, one past the last
        self.data_at = array("Q")
        self.hash_at = array("Q")
        self.end_at = array("Q")
        self.file_of_ino = array("q")  # set by number_inodes; -1: not a packed file

    # --- while packing (by file number) -----------------------------------------

    def begin_file(self, blocks: int) -> int:
        """Slots for a new file's data blocks; returns its file number."""
        number = len(self.data_at)
        self.data_at.append(len(self.spool))
        self._grow(blocks)
        return number

    def begin_hashes(self, number: int, blocks: int) -> None:
        """Slots for the hash blocks of the file being packed (the last one)."""
        if number != len(self.data_at) - 1 or len(self.hash_at) != number:
            raise ValueError("hash blocks must follow their own file's data blocks")
        self.hash_at.append(len(self.spool))
        self._grow(blocks)
        self.end_at.append(len(self.spool))

    def _grow(self, n: int) -> None:
        self.spool.extend([_EMPTY] * n)
        self.offset.extend([0] * n)
        self.info.extend([0] * n)
        self.crc.extend([0] * n)

    def slot(self, number: int, tree: int, index: int) -> int:
        at = self.data_at[number] if tree == TreeKind.DATA else self.hash_at[number]
        return at + index

    def set(self, slot: int, where: Where) -> None:
        spool, offset, info, crc = where
        self.spool[slot], self.offset[slot] = _CODE[spool], offset
        self.info[slot], self.crc[slot] = info, crc

    def at(self, slot: int) -> Where | None:
        code = self.spool[slot]
        if code == _EMPTY:
            return None
        return SPOOLS[code], self.offset[slot], self.info[slot], self.crc[slot]

    # --- after layout (by inode number) -----------------------------------------

    def number_inodes(self, file_of_ino: array) -> None:
        """From now on blocks are looked up by inode: `file_of_ino[ino]` is
        the inode's file number, or -1 (not a regular file). Index 0 is unused."""
        self.file_of_ino = file_of_ino

    def files(self) -> Iterator[int]:
        """The inode numbers of the packed files, in order."""
        return (ino for ino, number in enumerate(self.file_of_ino) if number >= 0)

    def span(self, ino: int, tree: int) -> tuple[int, int] | None:
        """The slots [first, end) of an inode's data or hash blocks."""
        if not 0 <= ino < len(self.file_of_ino):
            return None
        number = self.file_of_ino[ino]
        if number < 0 or number >= len(self.end_at):
            return None
        if tree == TreeKind.DATA:
            return self.data_at[number], self.hash_at[number]
        return self.hash_at[number], self.end_at[number]

    def get(self, ino: int, tree: int, index: int) -> Where | None:
        span = self.span(ino, tree)
        if span is None or not 0 <= index < span[1] - span[0]:
            return None
        return self.at(span[0] + index)

    def map_kinds(self, number: int, size: int) -> tuple[MapKind, MapKind]:
        """The map kinds (format.maps) for file `number`'s data and hash
        blocks as they are placed now; a block not placed yet (a profiled
        one, laid out at the end) makes its map FULL."""
        last = size - (self.hash_at[number] - self.data_at[number] - 1) * 4096
        data = self._kind(self.data_at[number], self.hash_at[number], last)
        return data, self._kind(self.hash_at[number], self.end_at[number], 4096)

    def _kind(self, first: int, end: int, last: int) -> MapKind:
        if first == end:
            return MapKind.FULL  # no blocks: the map takes no bytes at all
        codes = set(self.spool[first:end])
        if len(codes) > 1 or _EMPTY in codes:
            return MapKind.FULL  # offsets in different spools: no one base
        return choose_kind(self.info[first:end], self.offset[first:end], last, True)

    def placed(self) -> Iterator[tuple[int, int, int, Where]]:
        """(ino, tree, index, where) of every placed block, in that order."""
        for ino in range(1, len(self.file_of_ino)):
            for tree in (TreeKind.DATA, TreeKind.HASH):
                span = self.span(ino, tree)
                if span is None:
                    break
                for index in range(span[1] - span[0]):
                    where = self.at(span[0] + index)
                    if where is not None:
                        yield ino, int(tree), index, where
