"""Chunk digests of the compact index (the incompatible feature CHUNKS):
the index's regions, taken as one span, cut into chunks of 2^shift bytes,
each with its SHA-256 in a *chunk table* that follows the regions, and the
table cut into pieces of 4 KiB (128 digests), each piece's SHA-256 in the
INDEX record's body.

Why: a region CRC can only be checked by reading the whole region, so
opening an image cost time in proportion to its files (0.5 s at ten
million), and the signed root had to hash every index byte too. Now opening
reads the header and the piece digests (32 bytes per 512 KiB of index: 90 KB
at ten million files, covered by the record CRC and hashed into the signed
root), and a chunk is checked the first time a request reads from it, after
the table piece holding its digest has been checked against the body: a
chunk (or piece) that does not match fails every access to it with EIO, and
the rest of the index serves on.

`ChunkCheck.span` is on every index read, so it does one test a chunk and
no work once a chunk is known good. docs/format.md has the bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Callable, NamedTuple

from ..errors import CorruptImage

INCOMPAT_CHUNKS = 2
DIGEST_SIZE = 32
MIN_SHIFT, MAX_SHIFT = 12, 24  # 4 KiB .. 16 MiB chunks
# 4 KiB, a page: a first read of a cold chunk hashes it in ~3 us and reads
# from disk what reading the record alone would. Records read far apart (the
# one-parent check of a directory's 10,000 subdirectories, each in its own
# chunk) hash 40 MB at 4 KiB where 16 KiB chunks hashed 160 MB (~0.13 s at
# ten million files). The table is then 0.8% of the index, read piece by
# piece as chunks are first read.
DEFAULT_SHIFT = 12
MAX_CHUNKS = 1 << 24  # pack widens the chunks past this (a 64 GiB index)
PIECE_SIZE = 4096  # table bytes under one digest in the body: 128 chunk digests
_DESCRIPTOR = struct.Struct("<IIQ")  # shift, chunk count, table offset (absolute)
DESCRIPTOR_SIZE = _DESCRIPTOR.size
_UNCHECKED, GOOD, _BAD = 0, 1, 2  # a chunk's state (ChunkCheck.state)


def chunk_shift(span: int) -> int:
    """The shift pack uses for an index of `span` region bytes."""
    shift = DEFAULT_SHIFT
    while chunk_count(span, shift) > MAX_CHUNKS:
        shift += 1
    return shift


def chunk_count(span: int, shift: int) -> int:
    return (span + (1 << shift) - 1) >> shift


def piece_count(chunks: int) -> int:
    return (chunks * DIGEST_SIZE + PIECE_SIZE - 1) // PIECE_SIZE


def digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def piece_digests(table: bytes) -> bytes:
    """The body's digests of a whole chunk table, piece by piece."""
    return b"".join(digest(table[at:at + PIECE_SIZE]) for at in range(0, len(table), PIECE_SIZE))


class ChunkTable(NamedTuple):
    """What the body says of the chunks: their size, how many, where their
    digests are, and the digest of each table piece (a view of the body)."""

    shift: int
    count: int
    offset: int  # of the chunk table in the image file
    pieces: memoryview | bytes

    @property
    def length(self) -> int:
        return self.count * DIGEST_SIZE

    def encode(self) -> bytes:
        return _DESCRIPTOR.pack(self.shift, self.count, self.offset) + bytes(self.pieces)

    @classmethod
    def body_size(cls, chunks: int) -> int:
        """The body bytes after the index header for `chunks` chunks."""
        return DESCRIPTOR_SIZE + DIGEST_SIZE * piece_count(chunks)

    @classmethod
    def decode(cls, tail: memoryview, span: int) -> "ChunkTable":
        """From the body bytes after the index header; refuses a table that
        does not fit the span it covers (where it lies: `check_place`)."""
        if len(tail) < DESCRIPTOR_SIZE:
            raise CorruptImage("index chunk table is missing")
        shift, count, offset = _DESCRIPTOR.unpack_from(tail)
        if not MIN_SHIFT <= shift <= MAX_SHIFT:
            raise CorruptImage(f"index chunks of 2^{shift} bytes are not allowed")
        if count != chunk_count(span, shift) or len(tail) != cls.body_size(count):
            raise CorruptImage("index chunk table does not match the index's size")
        return cls(shift, count, offset, tail[DESCRIPTOR_SIZE:])

    def check_place(self, after: int, end: int) -> None:
        """The table must lie 8-aligned in [after, end): past the regions,
        inside the INDEX record."""
        if self.offset % 8 or self.offset < after or self.offset + self.length > end:
            raise CorruptImage("index chunk table lies outside the index record")


class ChunkCheck:
    """Which chunks of [base, end) of the image file `fd` are known to match
    their digests, and the digests of the table pieces checked so far."""

    def __init__(self, fd: int, base: int, end: int, table: ChunkTable | None,
                 damage: Callable[[str], OSError], unchunked_shift: int = 62):
        """`table` None: an index without CHUNKS, whose region CRCs were
        checked at open; it is one chunk (of 2^`unchunked_shift` bytes),
        taken as good. `damage` makes the error a damaged chunk raises
        (format.index's: EIO and a log line)."""
        self.fd, self.base, self.end, self.table = fd, base, end, table
        self.shift = table.shift if table else unchunked_shift
        self.damage = damage
        count = table.count if table else chunk_count(end - base, self.shift)
        self.state = bytearray([_UNCHECKED if table else GOOD]) * count
        self.pieces: dict[int, bytes] = {}  # table pieces checked against the body

    @property
    def bad(self) -> int:
        """Chunks found damaged so far."""
        return self.state.count(_BAD)

    def bounds(self, c: int) -> tuple[int, int]:
        """Where chunk `c` lies in the image file."""
        start = self.base + (c << self.shift)
        return start, min(start + (1 << self.shift), self.end)

    def span(self, start: int, stop: int) -> None:
        """Check the chunks holding [start, stop) (absolute offsets inside
        [base, end), as the readers' bounds checks leave them)."""
        if stop <= start:
            return
        state, shift, base = self.state, self.shift, self.base
        if start < base or stop > self.end:  # a caller's bounds check missed it
            raise self.damage(f"a read of bytes {start}..{stop} lies outside the index")
        for c in range((start - base) >> shift, ((stop - 1 - base) >> shift) + 1):
            if state[c] != GOOD:
                self.verify(c)

    def verify(self, c: int) -> None:
        """Hash chunk `c` unless known; raise `damage` if it is damaged."""
        state = self.state[c]
        if state == GOOD:
            return
        start, stop = self.bounds(c)
        if state == _UNCHECKED:
            # pread, not the mapping the readers use: hashing through it put
            # every page of a walked index in the daemon's resident set (a
            # million files: peak 128 MiB against 68), where the readers'
            # own touches are trimmed (IndexReader.read_one)
            if digest(os.pread(self.fd, stop - start, start)) == self._digest_of(c):
                self.state[c] = GOOD
                return
            self.state[c] = _BAD
        raise self.damage(f"index chunk {c} (bytes {start}.. of the image) does not match "
                          "its digest")

    def _digest_of(self, c: int) -> bytes:
        """Chunk `c`'s digest from its table piece, checked the first time."""
        per_piece = PIECE_SIZE // DIGEST_SIZE
        index, at = divmod(c, per_piece)
        piece = self.pieces.get(index)
        if piece is None:
            table = self.table
            start = table.offset + index * PIECE_SIZE
            piece = os.pread(self.fd, min(PIECE_SIZE, table.length - index * PIECE_SIZE), start)
            if digest(piece) != table.pieces[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]:
                for k in range(index * per_piece, min((index + 1) * per_piece, table.count)):
                    if self.state[k] == _UNCHECKED:
                        self.state[k] = _BAD
                raise self.damage(f"index chunk table piece {index} (bytes {start}.. of the "
                                  "image) does not match its digest")
            self.pieces[index] = piece
        return piece[at * DIGEST_SIZE:(at + 1) * DIGEST_SIZE]

    def all(self) -> list[int]:
        """Check every chunk (incfs verify); the damaged ones, in order."""
        bad = []
        for c in range(len(self.state)):
            try:
                self.verify(c)
            except OSError:
                bad.append(c)
        return bad
