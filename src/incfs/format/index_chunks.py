"""Chunk digests of the compact index (the incompatible feature CHUNKS):
the index's regions, taken as one span, cut into chunks of 2^shift bytes,
each with its SHA-256 in the INDEX record's body.

Why: a region CRC can only be checked by reading the whole region, so
opening an image cost time in proportion to its files (0.5 s at ten million),
and the signed root had to hash every index byte too. With a digest per
chunk, opening reads only the table (32 bytes a chunk, covered by the record
CRC and hashed into the signed root), and each chunk is hashed the first time
a request reads from it: a chunk that does not match its digest fails every
access to it with EIO, and the rest of the index serves on.

`ChunkCheck.span` is on every index read, so it does one test a chunk and
no work once a chunk is known good. docs/format.md has the bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable

from ..errors import CorruptImage

INCOMPAT_CHUNKS = 2
DIGEST_SIZE = 32
MIN_SHIFT, MAX_SHIFT = 12, 24  # 4 KiB .. 16 MiB chunks
# 4 KiB, a page: a first read of a cold chunk hashes it in ~3 us and reads
# from disk what reading the record alone would. Records read far apart (the
# one-parent check of a directory's 10,000 subdirectories, each in its own
# chunk) hash 40 MB at 4 KiB where 16 KiB chunks hashed 160 MB (~0.13 s at
# ten million files). The price is the table, 0.8% of the index (12 MB at
# ten million files, read at open in ~10 ms), still small against the index.
DEFAULT_SHIFT = 12
MAX_CHUNKS = 1 << 20  # pack widens the chunks past this: a 32 MB table at most
_DESCRIPTOR = struct.Struct("<II")  # shift, chunk count
DESCRIPTOR_SIZE = _DESCRIPTOR.size
_UNCHECKED, _GOOD, _BAD = 0, 1, 2


def chunk_shift(span: int) -> int:
    """The shift pack uses for an index of `span` region bytes."""
    shift = DEFAULT_SHIFT
    while chunk_count(span, shift) > MAX_CHUNKS:
        shift += 1
    return shift


def chunk_count(span: int, shift: int) -> int:
    return (span + (1 << shift) - 1) >> shift


def encode_table(shift: int, digests: bytes) -> bytes:
    """The body bytes after the index header: the chunk size, the count and
    the digests (back to back, in chunk order)."""
    return _DESCRIPTOR.pack(shift, len(digests) // DIGEST_SIZE) + digests


def decode_table(tail: memoryview, span: int) -> tuple[int, memoryview]:
    """(shift, digests) from the body bytes after the index header (a view,
    so the digests are not a second copy of the table); refuses a table
    that does not fit the span it covers."""
    if len(tail) < DESCRIPTOR_SIZE:
        raise CorruptImage("index chunk table is missing")
    shift, count = _DESCRIPTOR.unpack_from(tail)
    if not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise CorruptImage(f"index chunks of 2^{shift} bytes are not allowed")
    if count != chunk_count(span, shift) or len(tail) != DESCRIPTOR_SIZE + count * DIGEST_SIZE:
        raise CorruptImage("index chunk table does not match the index's size")
    return shift, tail[DESCRIPTOR_SIZE:]


def digest(data) -> bytes:
    return hashlib.sha256(data).digest()


class ChunkCheck:
    """Which chunks of [base, end) of the image file `fd` are known to match
    their digests."""

    def __init__(self, fd: int, base: int, end: int, shift: int, digests: memoryview | None,
                 damage: Callable[[str], OSError]):
        """`digests` None: an index without CHUNKS, whose region CRCs were
        checked at open; every chunk is taken as good. `damage` makes the
        error a damaged chunk raises (format.index's: EIO and a log line)."""
        self.fd, self.base, self.end, self.shift = fd, base, end, shift
        self.digests, self.damage = digests, damage
        count = chunk_count(end - base, shift)
        self.state = bytearray([_GOOD if digests is None else _UNCHECKED]) * count
        self.bad = 0  # chunks found damaged

    def span(self, start: int, stop: int) -> None:
        """Check the chunks holding [start, stop) (absolute offsets inside
        [base, end), as the readers' bounds checks leave them)."""
        if stop <= start:
            return
        state, shift, base = self.state, self.shift, self.base
        if start < base or stop > self.end:  # a caller's bounds check missed it
            raise self.damage(f"a read of bytes {start}..{stop} lies outside the index")
        for c in range((start - base) >> shift, ((stop - 1 - base) >> shift) + 1):
            if state[c] != _GOOD:
                self.verify(c)

    def verify(self, c: int) -> None:
        """Hash chunk `c` unless known; raise `damage` if it is damaged."""
        state = self.state[c]
        if state == _GOOD:
            return
        if state == _UNCHECKED:
            at = self.base + (c << self.shift)
            # pread, not the mapping the readers use: hashing through it put
            # every page of a walked index in the daemon's resident set (a
            # million files: peak 128 MiB against 68), where the readers'
            # own touches are trimmed (IndexReader.read_one)
            got = digest(os.pread(self.fd, min(at + (1 << self.shift), self.end) - at, at))
            if got == self.digests[c * DIGEST_SIZE:(c + 1) * DIGEST_SIZE]:
                self.state[c] = _GOOD
                return
            self.state[c] = _BAD
            self.bad += 1
        raise self.damage(f"index chunk {c} (bytes {self.base + (c << self.shift)}.. of the image) "
                     "does not match its digest")

    def all(self) -> list[int]:
        """Check every chunk (incfs verify); the damaged ones, in order."""
        bad = []
        for c in range(len(self.state)):
            try:
                self.verify(c)
            except OSError:
                bad.append(c)
        return bad
