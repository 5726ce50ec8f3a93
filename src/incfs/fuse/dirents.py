"""Directory listings encoded the way READDIR answers them.

A `Listing` is a directory's entries as fuse_dirent records (ino, the
offset of the next entry, name length, d_type, the name, zero padding to
8 bytes), packed once with a single struct call for the whole directory:
a cold walk lists every directory once, so what costs is the work per
entry, and a loop per entry in Python costs more than the kernel's whole
walk. A READDIR is then a slice of those bytes, as many whole records as
fit the size the kernel asked for, starting at its offset. READDIRPLUS
puts each entry's fuse_entry_out before its record, so it is made per
entry, and only as far as the reply goes. A listing can also be made of
records encoded elsewhere (`Listing.from_records`: incfs lists an index's
directories straight from their name blocks).

Offsets are entry numbers: the record of entry i says i + 1, so a
telldir/seekdir (or a reply cut short) resumes at the entry after.
"""

from __future__ import annotations

import stat
import struct
from array import array
from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Sequence

from . import abi

# a record's size and format by name length (names are 1..255 bytes); the
# size in 8-byte units fits a byte, so a listing's sizes are one translate
_SIZES = tuple(abi.dirent_size(n, plus=False) for n in range(256))
_UNITS = bytes(size // 8 for size in _SIZES)
_DT_DIR = stat.S_IFDIR >> 12
_FORMATS = tuple(f"QQII{n}s{_SIZES[n] - abi.DIRENT_HEAD.size - n}x" for n in range(256))


def encode_records(names: Sequence[bytes], inos: Sequence[int], types: bytes,
                   lengths: bytes) -> tuple[bytes, array]:
    """The fuse_dirent records of a listing, and where each starts (then
    the end of the last) in 8-byte units. `lengths`: each name's length as
    a byte (it must be right: an "Ns" field pads or cuts a name to N)."""
    count = len(names)
    fields: list = [0] * (5 * count)
    fields[0::5] = inos
    fields[1::5] = range(1, count + 1)
    fields[2::5] = lengths
    fields[3::5] = types
    fields[4::5] = names
    data = struct.pack("=" + lengths.decode("latin-1").translate(_FORMATS), *fields)
    return data, array("I", accumulate(lengths.translate(_UNITS), initial=0))


class Listing:
    """One directory's entries: `names`, the inode each names and its file
    type (mode >> 12) as a byte in `types`, in the order they are listed."""

    __slots__ = ("inos", "types", "ended", "_data", "_ends", "_dir_index")

    def __init__(self, names: Sequence[bytes], inos: Sequence[int], types: bytes,
                 lengths: bytes | None = None):
        """`lengths`: each name's length as a byte, when the caller has it."""
        count = len(names)
        if len(inos) != count or len(types) != count:
            raise ValueError("names, inodes and types differ in number")
        if lengths is None:
            lengths = bytes(map(len, names))  # ValueError for a name over 255 bytes
        elif len(lengths) != count:
            raise ValueError("names and lengths differ in number")
        self._set(*encode_records(names, inos, types, lengths), inos, types)

    @classmethod
    def from_records(cls, data: bytes, ends: array, inos: Sequence[int],
                     types: bytes) -> "Listing":
        """A listing whose records are made already (as `encode_records`
        makes them: the record of entry i says ino inos[i], offset i + 1,
        type types[i]), such as incfs.block_dirents makes from a name block."""
        if len(ends) != len(inos) + 1 or len(types) != len(inos) or ends[-1] * 8 != len(data):
            raise ValueError("records, inodes and types differ in number")
        listing = cls.__new__(cls)
        listing._set(data, ends, inos, types)
        return listing

    def _set(self, data: bytes, ends: array, inos: Sequence[int], types: bytes) -> None:
        self._data = data
        self._ends = ends  # where each record starts, and the end of the last, in 8-byte units
        self.inos = inos if isinstance(inos, list) else list(inos)
        self.types = bytes(types)
        self._dir_index: dict[int, int] | None = None
        # a reply went to the last entry (the walker has every name; its EOF
        # request comes once it has worked through them)
        self.ended = False

    def __len__(self) -> int:
        return len(self.inos)

    def directory_after(self, index: int) -> int | None:
        """The inode of the first directory listed after entry `index`
        (-1: from the start), or None."""
        found = self.types.find(_DT_DIR, index + 1)
        return None if found < 0 else self.inos[found]

    def index_of_directory(self, ino: int) -> int | None:
        """Where directory `ino` is listed, or None. A walk asks this once
        per subdirectory: a map made on the first call, over the
        directories only (an index() per call was quadratic in a
        directory of many subdirectories)."""
        if self._dir_index is None:
            index, found = {}, self.types.find(_DT_DIR)
            while found >= 0:
                index.setdefault(self.inos[found], found)
                found = self.types.find(_DT_DIR, found + 1)
            self._dir_index = index
        return self._dir_index.get(ino)

    def plain(self, offset: int, size: int) -> memoryview:
        """READDIR: the records from entry `offset` on that fit in `size`
        bytes (none past the end: the kernel takes an empty reply as EOF)."""
        if offset >= len(self.inos):
            self.ended = True
            return memoryview(b"")
        start = self._ends[offset]
        last = bisect_right(self._ends, start + size // 8, offset) - 1
        self.ended = self.ended or last == len(self.inos)
        return memoryview(self._data)[start * 8:self._ends[last] * 8]

    def plus(self, offset: int, size: int, entry_of: Callable[[int, int], bytes | None],
             files_size: int | None = None) -> bytes:
        """READDIRPLUS: each record after its inode's fuse_entry_out, from
        `entry_of(ino, d_type)` (the type the record says, which the entry
        must agree with); an entry it answers None for is left out. Past
        `files_size` bytes the reply goes on only while entries are
        directories."""
        parts: list[bytes | memoryview] = []
        used = 0
        soft = size if files_size is None else files_size
        data = memoryview(self._data)
        for i in range(offset, len(self.inos)):
            if parts and used >= soft and self.types[i] != _DT_DIR:
                break  # (never before the first: an empty reply means EOF)
            entry = entry_of(self.inos[i], self.types[i])
            if entry is None:
                continue
            start, end = self._ends[i] * 8, self._ends[i + 1] * 8
            used += len(entry) + end - start
            if used > size:
                break
            parts += (entry, data[start:end])
        else:
            self.ended = True
        return b"".join(parts)
