"""Fixed structures of the backing image: the superblock and the record header.

Every multi-byte integer is little-endian. `docs/format.md` describes the same
structures byte by byte; keep the two in step.

An image is::

    [superblock: 4096 bytes][record][record]...[record]

Records form an append-only log. Each starts with a 32-byte header that names
its type, its total length (so unknown types and data payloads can be
skipped), the offset of the previous record (a back link that catches a record
spliced in from elsewhere) and a CRC32 over the header and body.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import NamedTuple

from .. import BLOCK_SIZE
from ..errors import CorruptImage

SUPERBLOCK_SIZE = BLOCK_SIZE
LOG_START = SUPERBLOCK_SIZE
MAGIC = b"INCFSIMG"
VERSION_MAJOR = 1
# 1.1 added INODES2 (owners, devices, xattrs). Writers put 1 in a superblock
# only when the image holds such records, so other images still say 1.0.
VERSION_MINOR = 2
MINOR_POSIX = 1
MINOR_BASE = 0
# 1.2: the metadata is an INDEX record (pack writes it); later records are
# layered over it. 1.0 and 1.1 images (log only) still open as before.
MINOR_INDEX = 2

RECORD_MAGIC = 0x43455249  # b"IREC" read as a little-endian u32
RECORD_ALIGN = 8
MAX_RECORD_BODY = 64 * 1024 * 1024  # a bound on what a reader will buffer

# magic, major, minor, block_shift, hash_alg, flags, uuid, meta_end,
# data_start, data_end, packed_size, crc32
_SUPER = struct.Struct("<8sHHBBH16sQQQQI")
# magic, type, flags, length, prev, body_len, crc32
_HEADER = struct.Struct("<IHHQQII")
RECORD_HEADER_SIZE = _HEADER.size
assert RECORD_HEADER_SIZE == 32

HASH_SHA256 = 1


class RecordType(enum.IntEnum):
    """Record type codes. Codes >= 0x8000 are "critical": a reader that does
    not know one must refuse the image instead of skipping the record."""

    INODES = 1
    DIRENTS = 2
    BLOCKS = 3
    SOURCE_BLOCKS = 4
    DATA = 5
    SIGNATURE = 6
    PAD = 7  # filler so the next payload starts on a 4 KiB boundary
    # Data blocks of a cache given up (evicted) or moved to a file's plain
    # copy (incfs.space.records). Optional: a reader that skips it sees the
    # old maps point at punched holes, which fail their checks (never served).
    RELEASED = 8
    # Inodes with owners, device numbers and extended attributes (format 1.1).
    # Critical: a 1.0 reader must refuse the image rather than serve it with
    # inodes (and the names under them) missing.
    INODES2 = 0x8008
    # The compact metadata index (format 1.2, format/index.py): its body is
    # the index header, its payload the index regions. Critical: a reader
    # that skipped it would see an empty image.
    INDEX = 0x8009


CRITICAL_TYPE_BIT = 0x8000


class RecordFlags(enum.IntFlag):
    # A BLOCKS record that repairs blocks: its mappings win over earlier ones
    # (written only after the earlier bytes failed their check).
    REPLACES = 1


class SuperFlags(enum.IntFlag):
    PACKED = 1  # written by `incfs pack`: meta_end/data_* are meaningful
    CACHE = 2  # a local cache of a remote image: holds SOURCE_BLOCKS


_KNOWN_FLAGS = int(SuperFlags.PACKED | SuperFlags.CACHE)


class Superblock(NamedTuple):
    uuid: bytes
    flags: SuperFlags = SuperFlags(0)
    meta_end: int = 0
    data_start: int = 0
    data_end: int = 0
    packed_size: int = 0
    version_major: int = VERSION_MAJOR
    version_minor: int = MINOR_BASE

    def encode(self) -> bytes:
        body = _SUPER.pack(
            MAGIC, self.version_major, self.version_minor, 12, HASH_SHA256,
            int(self.flags), self.uuid, self.meta_end, self.data_start,
            self.data_end, self.packed_size, 0,
        )
        crc = zlib.crc32(body[:-4])
        body = body[:-4] + struct.pack("<I", crc)
        return body.ljust(SUPERBLOCK_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> "Superblock":
        if len(raw) < _SUPER.size:
            raise CorruptImage("file too short to hold an incfs superblock")
        fields = _SUPER.unpack_from(raw)
        magic, major, minor, shift, hash_alg, flags, uuid = fields[:7]
        meta_end, data_start, data_end, packed_size, crc = fields[7:]
        if magic != MAGIC:
            raise CorruptImage("not an incfs image (bad magic)")
        if zlib.crc32(raw[: _SUPER.size - 4]) != crc:
            raise CorruptImage("superblock checksum mismatch")
        if major != VERSION_MAJOR:
            raise CorruptImage(f"unsupported format version {major}.{minor}")
        if shift != 12 or hash_alg != HASH_SHA256:
            raise CorruptImage("unsupported block size or hash algorithm")
        unknown = flags & ~_KNOWN_FLAGS
        if unknown:
            # every superblock flag changes how the rest is read: an image
            # with one this version does not know is refused, not misread
            # (the index has compatible features of its own, format/index.py)
            raise CorruptImage(f"superblock flags 0x{unknown:x} are not known to this "
                               "version of incfs; a newer one wrote this image")
        # The payload must end inside the file pack wrote (all four are 0 in
        # an image that was never packed).
        if not (meta_end <= data_start <= data_end <= packed_size):
            raise CorruptImage("superblock regions out of order")
        # A packed image (or a cache of one) has metadata after the
        # superblock and a payload on a 4 KiB boundary.
        if packed_size and (meta_end < LOG_START or data_start % BLOCK_SIZE):
            raise CorruptImage("superblock regions out of place")
        return cls(uuid, SuperFlags(flags), meta_end, data_start, data_end,
                   packed_size, major, minor)


class RecordHeader(NamedTuple):
    type: int
    flags: int
    length: int  # whole record: header + body + payload + padding
    prev: int  # offset of the previous record, 0 for the first
    body_len: int  # bytes after the header that the CRC covers

    def encode(self, body: bytes) -> bytes:
        head = _HEADER.pack(RECORD_MAGIC, self.type, self.flags, self.length,
                            self.prev, self.body_len, 0)
        crc = zlib.crc32(body, zlib.crc32(head))
        return head[:-4] + struct.pack("<I", crc)

    @staticmethod
    def check(raw_header: bytes, body: bytes) -> bool:
        head = raw_header[:-4] + b"\0\0\0\0"
        (crc,) = struct.unpack_from("<I", raw_header, RECORD_HEADER_SIZE - 4)
        return zlib.crc32(body, zlib.crc32(head)) == crc

    @classmethod
    def decode(cls, raw: bytes) -> "RecordHeader | None":
        """Parse a header; None when these bytes are not a plausible header."""
        if len(raw) < RECORD_HEADER_SIZE:
            return None
        magic, rtype, flags, length, prev, body_len, _ = _HEADER.unpack_from(raw)
        if magic != RECORD_MAGIC:
            return None
        if length < RECORD_HEADER_SIZE + body_len or length % RECORD_ALIGN:
            return None
        if body_len > MAX_RECORD_BODY:
            return None
        return cls(rtype, flags, length, prev, body_len)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
