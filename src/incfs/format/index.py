"""The compact metadata index (format 1.2): fixed-size inode records, sorted
per-directory name blocks, per-file block maps and a heap, read on demand.

An INDEX record (a critical type, so older readers refuse the image) carries
a small header (and the chunk descriptor, format.index_chunks) as its
CRC-covered body; the four regions follow it as the record's payload, then
the chunk table. Every read of index bytes is checked against its chunk's
digest first (`IndexReader.check`). `docs/format.md` describes every byte;
keep them in step.

This module only encodes and decodes bytes: what the bytes mean to a live
namespace (the overlay of later records, the caches) is `incfs.index_ns`.
Every decode bounds-checks against the region it reads from, so a hostile
index raises IndexDamage (an EIO OSError), never an IndexError or a read
outside the index.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import zlib
from array import array
from itertools import accumulate
from typing import Iterator, NamedTuple

from .. import BLOCK_SIZE
from ..errors import CorruptImage
from .index_chunks import GOOD, INCOMPAT_CHUNKS, ChunkCheck, ChunkTable
from .maps import (HEAD_SIZE, INCOMPAT_MAP_KINDS, Columns, MapDamage, MapKind, columns_size,
                   decode_columns, decode_map, map_head)
from .records import MAX_METADATA, MAX_NAME, MAX_SYMLINK, InodeEntry, InodeFlags, Xattrs

log = logging.getLogger("incfs.index")

MAGIC = b"INCFSIDX"
VERSION = 1
INODE_SIZE = 128
TRIM_EVERY = 1 << 13  # inode reads between trims of the mapping (each can map 64 KiB)
DIRENT_SIZE = 16
ALIGN = 8
# Feature bits. A reader refuses an index with an incompatible bit it does
# not know (it could not read it right) and ignores unknown compatible ones.
# DTYPES: each name entry holds its child's file type (byte 5), so listing a
# directory reads no inode record; a reader without it, or an index without
# it, takes the types from the records instead.
COMPAT_DTYPES = 1
COMPAT_KNOWN = COMPAT_DTYPES
# MAP_KINDS: each block map starts with a head word naming its layout
# (format.maps), so most maps hold 2 bytes a block or none instead of 14.
# CHUNKS: a SHA-256 per 4 KiB chunk of the regions (format.index_chunks),
# checked as each chunk is first read, instead of a CRC per region checked
# at open: the chunk table follows the regions, the header its descriptor.
INCOMPAT_KNOWN = INCOMPAT_MAP_KINDS | INCOMPAT_CHUNKS
FLAG_POSIX = 1  # some inode has owners, a device number or attributes

REGIONS = ("inodes", "names", "maps", "heap")
# magic, version, inode_size, compat, incompat, inode_count, total_blocks,
# files, flags, reserved
_HEAD = struct.Struct("<8sHHIIQQQII")
_REGION = struct.Struct("<QQII")  # offset (absolute), length, crc32, reserved
HEADER_SIZE = _HEAD.size + len(REGIONS) * _REGION.size + 4
# mode, flags, xattr_count, size, mtime_ns, uid, gid, nlink, meta_len,
# reserved, parent, extent, count, hash_count, heap, heap_len, reserved,
# file_id, root_hash
_INODE = struct.Struct("<IHHQqIIIHHQQIIQII16s32s")
assert _INODE.size == INODE_SIZE
INODE_NLINK_AT = struct.calcsize("<IHHQqII")  # where `nlink` sits in a record
# the leading fields of an inode record that a stat answer uses
_STAT = struct.Struct("<I4xQqIII4xQQI")
# mode, then a file's extent, count and hash_count
_MAP_FIELDS = struct.Struct("<I44xQII")
# where a map's blocks start in the source, and how many it has
Span = tuple[int, int]
# name_off (from the block's start), name_len, d_type (with COMPAT_DTYPES,
# else 0), reserved, child
_DIRENT = struct.Struct("<IBBxxQ")
assert _DIRENT.size == DIRENT_SIZE
_XATTR = struct.Struct("<BI")
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


_FLAGS = (InodeFlags(0), InodeFlags.HAS_TREE)  # made once: enum calls are slow


class IndexDamage(OSError):
    """An inconsistency found in the index while serving: the access that
    met it fails with EIO (and a log line); the mount goes on."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, f"image index is damaged: {message}")


def damage(message: str) -> IndexDamage:
    log.warning("image index is damaged: %s", message)
    return IndexDamage(message)


class Region(NamedTuple):
    offset: int
    length: int
    crc: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class IndexHeader(NamedTuple):
    inode_count: int
    total_blocks: int
    files: int
    flags: int
    regions: dict[str, Region]
    compat: int = 0
    incompat: int = 0
    chunks: ChunkTable | None = None  # with CHUNKS: the chunks and their table

    @property
    def span(self) -> tuple[int, int]:
        """Where the regions start and end: what the chunks cover."""
        return self.regions["inodes"].offset, self.regions["heap"].end

    def encode(self) -> bytes:
        out = _HEAD.pack(MAGIC, VERSION, INODE_SIZE, self.compat, self.incompat,
                         self.inode_count, self.total_blocks, self.files, self.flags, 0)
        for name in REGIONS:
            r = self.regions[name]
            out += _REGION.pack(r.offset, r.length, r.crc, 0)
        out += struct.pack("<I", zlib.crc32(out))
        return out + self.chunks.encode() if self.chunks is not None else out

    @classmethod
    def decode(cls, body: bytes) -> "IndexHeader":
        if len(body) < HEADER_SIZE:
            raise CorruptImage(f"index header is {len(body)} bytes, expected {HEADER_SIZE}")
        (crc,) = struct.unpack_from("<I", body, HEADER_SIZE - 4)
        if zlib.crc32(body[:HEADER_SIZE - 4]) != crc:
            raise CorruptImage("index header checksum mismatch")
        (magic, version, inode_size, compat, incompat, count, total, files, flags,
         _) = _HEAD.unpack_from(body)
        if magic != MAGIC or version != VERSION or inode_size != INODE_SIZE:
            raise CorruptImage(f"unsupported index (version {version}, inode size {inode_size})")
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise CorruptImage(f"index needs features {unknown:#x} unknown to this version "
                               "of incfs; upgrade incfs to read this image")
        regions = {}
        for i, name in enumerate(REGIONS):
            off, length, rcrc, _ = _REGION.unpack_from(body, _HEAD.size + i * _REGION.size)
            regions[name] = Region(off, length, rcrc)
        head = cls(count, total, files, flags, regions, compat, incompat)
        if not incompat & INCOMPAT_CHUNKS:
            if len(body) != HEADER_SIZE:
                raise CorruptImage(f"index header is {len(body)} bytes, expected {HEADER_SIZE}")
            return head
        first, end = head.span
        return head._replace(chunks=ChunkTable.decode(memoryview(body)[HEADER_SIZE:],
                                                    max(0, end - first)))

    def check_layout(self, start: int, end: int) -> None:
        """The regions must lie in order inside [start, end), 8-aligned and
        apart, then the chunk table (with CHUNKS), and the inode table must
        hold exactly inode_count records."""
        cursor = start
        for name in REGIONS:
            r = self.regions[name]
            if r.offset < cursor or r.end > end or r.offset % ALIGN:
                raise CorruptImage(f"index region {name} lies outside the index record "
                                   "or overlaps another")
            cursor = r.end
        if self.chunks is not None:
            self.chunks.check_place(cursor, end)
        if self.regions["inodes"].length != self.inode_count * INODE_SIZE:
            raise CorruptImage("index inode table does not match its inode count")
        if self.inode_count < 1:
            raise CorruptImage("index holds no root directory")


def check_crcs(header: IndexHeader, fd: int) -> None:
    """Refuse the image when a region's bytes do not match their CRC (an
    index without CHUNKS: one with them is checked chunk by chunk as it is
    read). Read with pread, not through the mapping: the pages read stay out
    of the daemon's resident set until a request needs them."""
    if header.chunks is not None:
        return
    for name in REGIONS:
        r = header.regions[name]
        if region_crc(fd, r.offset, r.length) != r.crc:
            raise CorruptImage(f"index region {name} checksum mismatch")


def region_crc(fd: int, offset: int, length: int, chunk: int = 1 << 22) -> int:
    crc = 0
    for at in range(offset, offset + length, chunk):
        crc = zlib.crc32(os.pread(fd, min(chunk, offset + length - at), at), crc)
    return crc


class NameBlock(NamedTuple):
    """A directory's name block decoded: names in stored order, the inode of
    each, each child's file type (mode >> 12, a d_type) as one byte, and
    each name's length as one byte. `stored_types`: the types are the name
    block's own (COMPAT_DTYPES), not read from the children's records, so
    they are to be compared with a record before it is served for the name."""

    names: tuple[bytes, ...]
    children: list[int]
    types: bytes
    lengths: bytes
    stored_types: bool = False


# "5s" for a name of 5 bytes: a block's names unpack with one format, made
# by str.translate of the lengths (a third faster than a join per name)
_NAME_FORMATS = tuple(f"{n}s" for n in range(256))
# a mode's second byte -> its top four bits (the file type)
_HIGH_NIBBLE = bytes(b >> 4 for b in range(256))


class InodeRecord(NamedTuple):
    """An inode record decoded, with where its names, map or heap bytes are."""

    entry: InodeEntry
    nlink: int
    parent: int
    extent: int  # directories: names offset; files: map offset (region-relative)
    count: int  # directories: names; files: data blocks
    hash_count: int  # files: hash-tree blocks


class IndexReader:
    """Random access to an index held in `view` (an mmap of the image file
    `fd`). Every read of index bytes first has `check` vouch for their chunks."""

    def __init__(self, view, header: IndexHeader, fd: int):
        self.view = view
        self.header = header
        self.count = header.inode_count
        self.r = header.regions
        self.reads = 0  # since the mapping was last trimmed
        self.stored_types = bool(header.compat & COMPAT_DTYPES)
        first, end = header.span
        # without CHUNKS the whole index is one chunk, taken as good (its
        # region CRCs were checked at open): the readers' checks cost the same
        self.check = ChunkCheck(fd, first, end, header.chunks, damage)
        shift = self.check.shift
        self._table = first
        self._chunk_state = self.check.state
        self._records_shift = shift - 7  # inode n's chunk: (n - 1) >> this
        assert 1 << 7 == INODE_SIZE

    def _record(self, ino: int) -> int:
        """Where inode `ino`'s record is, range- and chunk-checked (a record
        never straddles two chunks: both are multiples of 128 bytes from
        the inode table's start)."""
        if not 1 <= ino <= self.count:
            raise damage(f"inode {ino} is out of range")
        chunk = (ino - 1) >> self._records_shift
        if self._chunk_state[chunk] != GOOD:
            self.check.verify(chunk)
        return self._table + (ino - 1) * INODE_SIZE

    def read_one(self, n: int = 1) -> None:
        """Count `n` inode reads; every TRIM_EVERY, drop the mapping's pages
        from our resident set (they stay in the page cache: the next touch is
        a minor fault), so a walk of a big index does not pin it all in the
        daemon."""
        self.reads += n
        if self.reads >= TRIM_EVERY:
            self.reads = 0
            madvise = getattr(self.view, "madvise", None)
            if madvise is not None:
                madvise(mmap.MADV_DONTNEED)

    # --- inodes ---------------------------------------------------------------

    def inode(self, ino: int) -> InodeRecord:
        (mode, flags, xcount, size, mtime, uid, gid, nlink, meta_len, reserved, parent, extent,
         count, hcount, heap, heap_len, reserved2, file_id,
         root) = _INODE.unpack_from(self.view, self._record(ino))
        if reserved or reserved2 or flags & ~int(InodeFlags.HAS_TREE):
            raise damage(f"inode {ino} has reserved bits set")
        meta, target, xattrs = self._heap(ino, heap, heap_len, meta_len, mode, count, xcount)
        rdev = extent if _is_device(mode) else 0
        entry = InodeEntry(ino, mode, size, mtime, file_id, root, _FLAGS[flags], meta,
                           target, uid, gid, rdev, xattrs)
        return InodeRecord(entry, nlink, parent, extent, count, hcount)

    def stat_fields(self, ino: int) -> tuple:
        """(mode, size, mtime_ns, uid, gid, nlink, parent, extent, count): what
        a stat answer needs, in one unpack and without the heap."""
        return _STAT.unpack_from(self.view, self._record(ino))

    def parent_of(self, ino: int) -> int:
        """Only the parent field (checking a directory's children needs no more)."""
        return _U64.unpack_from(self.view, self._record(ino) + 40)[0]

    def mode_of(self, ino: int) -> int:
        return _U32.unpack_from(self.view, self._record(ino))[0]

    def xattr_count(self, ino: int) -> int:
        """Only the record's attribute count (after mode and flags)."""
        return _U16.unpack_from(self.view, self._record(ino) + 6)[0]

    def prefetch(self, inos: list[int]) -> None:
        """Ask the kernel to read these inodes' records in, all at once and
        without waiting (MADV_WILLNEED): a check that then reads records
        scattered over the table (a directory's subdirectories) waits for
        the disk about once, instead of once per fault, each of which
        would also read 128 KiB around its record. Each record's page and
        the next: pack numbers a directory's children right after it, and
        its first READDIRPLUS reads theirs. `inos` must be in range."""
        madvise = getattr(self.view, "madvise", None)
        if madvise is None:
            return
        table, page = self.r["inodes"].offset, mmap.PAGESIZE
        for ino in inos:
            madvise(mmap.MADV_WILLNEED, (table + (ino - 1) * INODE_SIZE) & -page, 2 * page)

    def _heap(self, ino: int, off: int, length: int, meta_len: int, mode: int, count: int,
              xcount: int) -> tuple[bytes, bytes, Xattrs]:
        target_len = count if _is_symlink(mode) else 0
        heap = self.r["heap"]
        if off + length > heap.length or meta_len > MAX_METADATA or target_len > MAX_SYMLINK:
            raise damage(f"inode {ino}: heap bytes out of range")
        if not length:
            if meta_len or target_len or xcount:
                raise damage(f"inode {ino}: heap bytes out of range")
            return b"", b"", ()
        self.check.span(heap.offset + off, heap.offset + off + length)
        blob = bytes(self.view[heap.offset + off:heap.offset + off + length])
        meta, target = blob[:meta_len], blob[meta_len:meta_len + target_len]
        if meta_len + target_len > length:
            raise damage(f"inode {ino}: heap bytes out of range")
        xattrs = _decode_xattrs(ino, blob, meta_len + target_len, xcount)
        return meta, target, xattrs

    # --- directories ------------------------------------------------------------

    def _dirent(self, base: int, i: int) -> tuple[int, int, int]:
        """(name_off, name_len, child) of entry `i` (its d_type: stored_type)."""
        at = base + i * DIRENT_SIZE
        self.check.span(at, at + DIRENT_SIZE)
        off, length, _d_type, child = _DIRENT.unpack_from(self.view, at)
        return off, length, child

    def dir_base(self, ino: int, extent: int, count: int) -> int:
        """Where a directory's block starts; its table must fit the region."""
        names = self.r["names"]
        if extent % ALIGN or extent + count * DIRENT_SIZE > names.length:
            raise damage(f"directory {ino}: its names lie outside the index")
        return names.offset + extent

    def name_at(self, ino: int, base: int, i: int, count: int) -> tuple[bytes, int]:
        off, length, child = self._dirent(base, i)
        start = base + off
        if off < count * DIRENT_SIZE or start + length > self.r["names"].end:
            raise damage(f"directory {ino}: a name lies outside the index")
        self.check.span(start, start + length)
        return bytes(self.view[start:start + length]), child

    def find(self, ino: int, base: int, count: int, name: bytes) -> tuple[int, int] | None:
        """Binary search of a (checked, sorted) name block: (entry, child)."""
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            got, child = self.name_at(ino, base, mid, count)
            if got == name:
                return mid, child
            if got < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def names(self, ino: int, base: int, count: int) -> Iterator[tuple[bytes, int]]:
        for i in range(count):
            yield self.name_at(ino, base, i, count)

    def name_block(self, ino: int, base: int, count: int) -> NameBlock:
        """A directory's whole name block decoded at once, with each child's
        file type. Bounds are checked, nothing else (see IndexNamespace)."""
        table = self._table_of(base, count)
        children = table.cast("Q")[1::2].tolist()
        lengths = bytes(table[4::DIRENT_SIZE])
        names = self._contiguous_names(base, count, table, lengths)
        if names is None:  # a writer other than ours may place names anywhere
            names = tuple(self.name_at(ino, base, i, count)[0] for i in range(count))
        self._check_range(ino, children)
        if self.stored_types:
            return NameBlock(names, children, bytes(table[5::DIRENT_SIZE]), lengths, True)
        return NameBlock(names, children, self.types_of(children), lengths)

    def listed(self, ino: int, base: int, count: int) -> tuple[list[int], bytes]:
        """A block's children and their file types (as NameBlock has them),
        without its names; with types from the children's records, the
        children are range-checked first (else the caller's to check)."""
        table = self._table_of(base, count)
        children = table.cast("Q")[1::2].tolist()
        if self.stored_types:
            return children, bytes(table[5::DIRENT_SIZE])
        self._check_range(ino, children)
        return children, self.types_of(children)

    def block_bytes(self, base: int, count: int) -> memoryview:
        """A name block's table and the names after it, as `encode_names`
        writes them (back to back: their lengths say how far), cut at the
        end of the names region; checked against their chunks."""
        lengths = self._table_of(base, count)[4::DIRENT_SIZE]
        end = min(base + count * DIRENT_SIZE + sum(bytes(lengths)), self.r["names"].end)
        self.check.span(base, end)
        return memoryview(self.view)[base:end]

    def _table_of(self, base: int, count: int) -> memoryview:
        """A name block's entry table (`dir_base` checked its bounds)."""
        end = base + count * DIRENT_SIZE
        self.check.span(base, end)
        return memoryview(self.view)[base:end]

    def _check_range(self, ino: int, children: list[int]) -> None:
        if children and not (1 <= min(children) and max(children) <= self.count):
            raise damage(f"directory {ino}: a child is out of range")

    def _contiguous_names(self, base: int, count: int, table: memoryview,
                          lengths: bytes) -> tuple[bytes, ...] | None:
        """The names in one unpack when they follow the table back to back
        in entry order (as `encode_names` writes them), else None."""
        ends = array("I", accumulate(lengths, initial=count * DIRENT_SIZE))
        if table.cast("I")[0::4].tobytes() != memoryview(ends)[:-1].tobytes():
            return None
        start = base + ends[0]
        if base + ends[-1] > self.r["names"].end:
            return None  # name_at says which one lies outside
        self.check.span(start, base + ends[-1])
        view = memoryview(self.view)[start:base + ends[-1]]
        return struct.unpack(lengths.decode("latin-1").translate(_NAME_FORMATS), view)

    def stored_type(self, base: int, i: int) -> int:
        """Entry `i`'s d_type as its name block has it (COMPAT_DTYPES)."""
        at = base + i * DIRENT_SIZE
        self.check.span(at, at + DIRENT_SIZE)
        return self.view[at + 5]

    def types_of(self, inos: list[int]) -> bytes:
        """The file type (mode >> 12) of each inode, one byte each: the
        d_type of a listing. Sibling files usually have consecutive numbers,
        whose modes one strided slice reads."""
        self.read_one(len(inos))
        if inos and inos == list(range(inos[0], inos[0] + len(inos))):
            first = self._record(inos[0])
            end = self._record(inos[-1]) + INODE_SIZE
            self.check.span(first, end)
            return bytes(memoryview(self.view)[first + 1:end:INODE_SIZE]  # modes' second bytes
                         ).translate(_HIGH_NIBBLE)
        return bytes([self.mode_of(ino) >> 12 & 0xF for ino in inos])

    # --- block maps ---------------------------------------------------------------

    def map_columns(self, ino: int, extent: int, count: int, hash_count: int,
                    last_size: int, data_end: int) -> tuple[Columns, Columns]:
        """(offsets, infos, crcs) for the data blocks, then for the hash
        blocks; `last_size` is the plain size of the last data block and
        `data_end` where the image's (or a cache's source's) data ends."""
        at, room = self._map_at(ino, extent)
        if not self.header.incompat & INCOMPAT_MAP_KINDS:
            return self._column_maps(ino, extent, count, hash_count)
        try:
            data, used = decode_map(self.view, at, room, count, last_size, data_end)
            hashes, hash_used = decode_map(self.view, at + used, room - used, hash_count,
                                           BLOCK_SIZE, data_end)
        except MapDamage as e:
            self.check.span(at, at + min(room, 8))  # a damaged chunk, if it is one, says so
            raise damage(f"file {ino}: {e}") from None
        # decoded first (decode_map is bounds-safe on any bytes), checked
        # before use: only the map knows its own length
        self.check.span(at, at + used + hash_used)
        return data, hashes

    def laid_out(self, ino: int) -> tuple[Span | None, Span | None] | None:
        """For regular file `ino`, (base, count) of its data map and of its
        hash map when that map lays its blocks back to back (RUN, RAW, or
        no blocks), None for one that lists every offset (FULL, or any map
        of an index without MAP_KINDS); None for any other inode. Reads
        two map heads, not the maps: a 1 GiB file's is 262,144 entries."""
        mode, extent, count, hash_count = _MAP_FIELDS.unpack_from(self.view, self._record(ino))
        if not _is_regular(mode):
            return None
        if not self.header.incompat & INCOMPAT_MAP_KINDS:
            return (None if count else (0, 0)), (None if hash_count else (0, 0))
        at, room = self._map_at(ino, extent)
        spans: list[Span | None] = []
        for n in (count, hash_count):
            if not n:
                spans.append((0, 0))
                continue
            self.check.span(at, at + min(room, HEAD_SIZE))
            try:
                kind, base, size = map_head(self.view, at, room, n)
            except MapDamage as e:
                raise damage(f"file {ino}: {e}") from None
            spans.append(None if kind is MapKind.FULL else (base, n))
            at, room = at + size, room - size
        return spans[0], spans[1]

    def _map_at(self, ino: int, extent: int) -> tuple[int, int]:
        """(where file `ino`'s maps start, bytes of the maps region from
        there) for its record's `extent`, which must lie in the region."""
        maps = self.r["maps"]
        if extent % ALIGN or extent > maps.length:
            raise damage(f"file {ino}: its block map lies outside the index")
        return maps.offset + extent, maps.length - extent

    def _column_maps(self, ino: int, extent: int, count: int,
                     hash_count: int) -> tuple[Columns, Columns]:
        """An index without MAP_KINDS: both maps as three columns."""
        maps = self.r["maps"]
        if extent + columns_size(count) + columns_size(hash_count) > maps.length:
            raise damage(f"file {ino}: its block map lies outside the index")
        at = maps.offset + extent
        self.check.span(at, at + columns_size(count) + columns_size(hash_count))
        return (decode_columns(self.view, at, count),
                decode_columns(self.view, at + columns_size(count), hash_count))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _is_device(mode: int) -> bool:
    return (mode & 0o170000) in (0o020000, 0o060000)


def _is_regular(mode: int) -> bool:
    return (mode & 0o170000) == 0o100000


def _is_symlink(mode: int) -> bool:
    return (mode & 0o170000) == 0o120000


def _decode_xattrs(ino: int, blob: bytes, pos: int, count: int) -> Xattrs:
    pairs = []
    for _ in range(count):
        if pos + _XATTR.size > len(blob):
            raise damage(f"inode {ino}: extended attributes run past their heap bytes")
        nlen, vlen = _XATTR.unpack_from(blob, pos)
        pos += _XATTR.size
        if pos + nlen + vlen > len(blob):
            raise damage(f"inode {ino}: extended attributes run past their heap bytes")
        pairs.append((blob[pos:pos + nlen], blob[pos + nlen:pos + nlen + vlen]))
        pos += nlen + vlen
    if pos != len(blob):
        raise damage(f"inode {ino}: heap bytes left over after its attributes")
    return tuple(pairs)


# --- writing -----------------------------------------------------------------

def heap_blob(e: InodeEntry) -> bytes:
    parts = [e.metadata, e.target]
    for name, value in e.xattrs:
        parts.append(_XATTR.pack(len(name), len(value)) + name + value)
    return b"".join(parts)


def encode_inode(e: InodeEntry, nlink: int, parent: int, extent: int, count: int,
                 hash_count: int, heap: int, heap_len: int) -> bytes:
    if _is_device(e.mode):
        extent = e.rdev
    return _INODE.pack(e.mode, int(e.flags), len(e.xattrs), e.size, e.mtime_ns, e.uid, e.gid,
                       nlink, len(e.metadata), 0, parent, extent, count, hash_count, heap,
                       heap_len, 0, e.file_id, e.root_hash)


def names_size(names: list[bytes]) -> int:
    """The bytes of the name block that holds `names`."""
    return _aligned(len(names) * DIRENT_SIZE + sum(map(len, names)))


def encode_names(children: list[tuple[bytes, int, int]]) -> bytes:
    """A name block: the table of (offset, length, d_type, child), then the
    names; `children` (name, child, d_type) must be sorted by name."""
    table, names = [], []
    pos = len(children) * DIRENT_SIZE
    for name, child, d_type in children:
        if len(name) > MAX_NAME:
            raise ValueError("name longer than 255 bytes")
        table.append(_DIRENT.pack(pos, len(name), d_type, child))
        names.append(name)
        pos += len(name)
    blob = b"".join(table) + b"".join(names)
    return blob + bytes(_aligned(len(blob)) - len(blob))
