"""Writing a packed image's metadata as an index (format 1.2): the inode
table, name blocks, block maps and heap of `format.index`.

The packer hands the inodes over as it numbers them (`inode`, in inode
order) and then each of their names (`name`). Every inode record and heap
blob is encoded at once into its region's spool file, and a directory's name
block is written (at the place reserved for it when the directory was
numbered) as soon as its last child has a number: what stays in memory is
the listings of the directories still open, which a walk in inode order
bounds by the depth of the tree. Only the block maps wait for the end, since
they hold payload offsets that depend on the index's own size.

Each region is copied into the image once every region's size is known, so
the index is never one byte string in memory. The bytes depend only on the
tree and the block placement, so packing the same tree twice gives the same
index (the signed root).
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import ROOT_INO
from .blockmap import ABSENT
from .format.index import (COMPAT_DTYPES, FLAG_POSIX, HEADER_SIZE, INODE_NLINK_AT, INODE_SIZE,
                           REGIONS, IndexHeader, Region, encode_inode, encode_names,
                           heap_blob, names_size, region_crc)
from .format.index_chunks import (DIGEST_SIZE, INCOMPAT_CHUNKS, ChunkTable, chunk_count,
                                  chunk_shift, digest, piece_digests)
from .format.maps import (INCOMPAT_MAP_KINDS, MapKind, columns_size, encode_columns, encode_map,
                          map_size, run_offsets)
from .format.layout import RECORD_ALIGN, RECORD_HEADER_SIZE, RecordType
from .format.log import LogAppender
from .format.records import BlockKind, InodeEntry, TreeKind, file_type, needs_inodes2
from .integrity.merkle import TreeGeometry, block_count
from .pack_blocks import Placements

# Room kept after the index for the SIGNATURE record (an RSA-4096 signature
# is 512 bytes) and the PAD header before the payload.
SIGNATURE_ROOM = 4096


@dataclass
class IndexPlan:
    """Where the index goes: `payload` is where the block payload will start."""

    record: int  # offset of the INDEX record
    start: int  # its first region byte
    table: int  # where its chunk table goes (CHUNKS), after the regions
    end: int  # just past its last byte
    payload: int


@dataclass
class _Listing:
    """A directory whose name block waits for its children's numbers."""

    extent: int  # where its block goes in the names region
    names: list[bytes]  # sorted, as the walk will name the children
    children: list[int] = field(default_factory=list)
    types: bytearray = field(default_factory=bytearray)  # each child's d_type


def _tree_counts(e: InodeEntry) -> tuple[int, int]:
    """(data blocks, hash blocks) of a regular file's block maps."""
    if e.size <= 4096:  # one block or none: no hash blocks (the common case)
        return (1 if e.size else 0), 0
    hashes = TreeGeometry(e.size).hash_blocks if int(e.flags) & 1 else 0
    return block_count(e.size), hashes


class IndexWriter:
    """Takes the laid-out tree inode by inode and writes the INDEX record."""

    def __init__(self, tmpdir: Path, map_kinds: bool = True, chunks: bool = True):
        # map_kinds / chunks False: maps / a region CRC as a writer before
        # MAP_KINDS / CHUNKS made them (the tests of reading old images)
        self.map_kinds = map_kinds
        self.chunks = chunks
        self.files: dict[str, BinaryIO] = {name: tempfile.TemporaryFile(dir=tmpdir)
                                           for name in REGIONS}
        self.length = dict.fromkeys(REGIONS, 0)  # bytes each region has (or has reserved)
        self.count = self.total_blocks = self.regular = 0
        self.posix = False
        self.open: dict[int, _Listing] = {}
        self.extra_links: dict[int, int] = {}  # ino -> names beyond its first
        self.last = 0  # the inode numbered last, until its first name comes
        self.last_type = 0  # its file type (mode >> 12): the d_type of that name
        # map kinds (data, hash) by inode number, 2 bytes an inode (0: FULL)
        self.kinds = bytearray(2)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    # --- while the packer numbers the tree ----------------------------------------

    def inode(self, e: InodeEntry, parent: int, names: list[bytes] | None,
              subdirs: int, kinds: tuple[MapKind, MapKind] = (MapKind.FULL, MapKind.FULL)
              ) -> None:
        """Inode `e` (numbered next); a directory brings its children's names,
        sorted, and how many of them are directories; `parent` is its parent's
        inode number (0 for the root); a regular file its block maps' kinds
        (`Placements.map_kinds`), which fix their sizes now."""
        if e.ino != self.count + 1:
            raise ValueError("an index needs inodes numbered 1..N in order")
        self.count = e.ino
        nlink, extent, count, hashes = 1, 0, 0, 0
        fmt = stat.S_IFMT(e.mode)
        if fmt == stat.S_IFDIR:
            # a log replay counts one per name (the root has none) plus one
            # per subdirectory
            nlink = (e.ino != ROOT_INO) + subdirs
            extent, count = self._reserve_names(e.ino, names or [])
        else:
            parent = 0  # only a directory records its parent
        if fmt == stat.S_IFREG:
            count, hashes = _tree_counts(e)
            if not int(e.flags) & 1:
                kinds = (MapKind.FULL, MapKind.FULL)  # no tree: the CRCs are the check
            extent = self._reserve("maps", self._map_size(kinds[0], count)
                                   + self._map_size(kinds[1], hashes))
            self.regular += 1
            self.total_blocks += count + hashes
        elif fmt == stat.S_IFLNK:
            count = len(e.target)
        heap = heap_len = 0
        if e.metadata or e.target or e.xattrs:
            blob = heap_blob(e)
            heap, heap_len = self._append("heap", blob), len(blob)
        self.posix = self.posix or needs_inodes2(e)
        self._append("inodes", encode_inode(e, nlink, parent, extent, count, hashes, heap,
                                            heap_len))
        self.kinds += bytes(kinds) if fmt == stat.S_IFREG else b"\0\0"
        self.last = e.ino
        self.last_type = file_type(fmt)

    def _map_size(self, kind: MapKind, blocks: int) -> int:
        return map_size(kind, blocks) if self.map_kinds else columns_size(blocks)

    def name(self, child: int, parent: int, name: bytes) -> None:
        """`name` in directory `parent` is inode `child`; names must come in
        each directory's listing order. A name for an inode other than the
        one just numbered is a hard link."""
        listing = self.open.get(parent)
        at = len(listing.children) if listing is not None else 0
        if listing is None or at >= len(listing.names) or listing.names[at] != name:
            raise ValueError(f"name {name!r} out of its directory's listing order")
        listing.children.append(child)
        if child != self.last:
            self.extra_links[child] = self.extra_links.get(child, 0) + 1
            listing.types.append(self._type_of(child))
        else:
            listing.types.append(self.last_type)
        self.last = 0
        if at + 1 == len(listing.names):
            del self.open[parent]
            self._write_names(listing)

    def _type_of(self, ino: int) -> int:
        """The file type of an inode numbered before (a hard link's), from
        its record in the spool."""
        f = self.files["inodes"]
        f.flush()
        (mode,) = struct.unpack("<I", os.pread(f.fileno(), 4, (ino - 1) * INODE_SIZE))
        return file_type(mode)

    def _reserve_names(self, ino: int, names: list[bytes]) -> tuple[int, int]:
        extent = self._reserve("names", names_size(names))
        if names:
            self.open[ino] = _Listing(extent, names)
        return extent, len(names)

    def _write_names(self, listing: _Listing) -> None:
        blob = encode_names(list(zip(listing.names, listing.children, listing.types)))
        f = self.files["names"]
        f.seek(listing.extent)
        f.write(blob)

    def _reserve(self, region: str, n: int) -> int:
        at = self.length[region]
        self.length[region] = at + n
        return at

    def _append(self, region: str, blob: bytes) -> int:
        at = self._reserve(region, len(blob))
        self.files[region].write(blob)
        return at

    # --- once the payload is laid out -------------------------------------------------

    def finish(self, fd: int, app: LogAppender, placed: Placements,
               spool_rel: dict[str, int]) -> IndexPlan:
        """Append the INDEX record; `placed` gives each block's (spool,
        offset in spool, info, crc) by inode and `spool_rel` each spool's
        place inside the payload. Returns the plan (where the payload starts)."""
        if self.open:
            raise ValueError("directories left without all their names")
        self._patch_links()
        span = sum(self.length.values())
        shift = chunk_shift(span)
        count = chunk_count(span, shift) if self.chunks else 0
        plan = _plan(app.end, span, ChunkTable.body_size(count) if self.chunks else 0,
                     count * DIGEST_SIZE)
        base = {name: plan.payload + rel for name, rel in spool_rel.items()}
        written = _write_maps(self.files["maps"], placed, base,
                              self.kinds if self.map_kinds else None)
        if written != self.length["maps"]:
            raise ValueError("block maps differ from the sizes their files' inodes gave")
        regions, at = {}, plan.start
        for name in REGIONS:
            f, length = self.files[name], self.length[name]
            f.flush()
            crc = 0 if self.chunks else region_crc(f.fileno(), 0, length)
            regions[name] = Region(at, length, crc)
            _copy(f, fd, at, length)
            at += length
        chunks = None
        if self.chunks:
            digests = _chunk_digests(fd, plan.start, plan.start + span, shift)
            os.pwrite(fd, digests, plan.table)
            chunks = ChunkTable(shift, count, plan.table, piece_digests(digests))
        incompat = (INCOMPAT_MAP_KINDS if self.map_kinds else 0) | (
            INCOMPAT_CHUNKS if self.chunks else 0)
        header = IndexHeader(self.count, self.total_blocks, self.regular,
                             FLAG_POSIX if self.posix else 0, regions, compat=COMPAT_DTYPES,
                             incompat=incompat, chunks=chunks)
        start = app.begin_record(RecordType.INDEX, header.encode(), plan.end - plan.start)
        assert start == plan.start, (start, plan.start)
        if os.fstat(fd).st_size < app.end:
            os.ftruncate(fd, app.end)  # the record's alignment padding
        return plan

    def _patch_links(self) -> None:
        """A hard-linked inode's record was written with one name."""
        f = self.files["inodes"]
        f.flush()
        for ino, extra in self.extra_links.items():
            at = (ino - 1) * INODE_SIZE + INODE_NLINK_AT
            (nlink,) = struct.unpack("<I", os.pread(f.fileno(), 4, at))
            os.pwrite(f.fileno(), struct.pack("<I", nlink + extra), at)


def _chunk_digests(fd: int, start: int, end: int, shift: int) -> bytes:
    """The regions' chunk digests, read back from the image (the page cache
    has them: they were just written)."""
    size, out = 1 << shift, []
    for at in range(start, end, size):
        out.append(digest(os.pread(fd, min(size, end - at), at)))
    return b"".join(out)


def _plan(record: int, span: int, tail: int, table: int) -> IndexPlan:
    """`span`: the regions' bytes; `tail`: the body's bytes after the index
    header (the chunk descriptor and piece digests); `table`: the chunk
    table's bytes, which follow the regions."""
    start = record + _aligned(RECORD_HEADER_SIZE + HEADER_SIZE + tail)
    table_at = _aligned(start + span)
    end = table_at + table if table else start + span
    payload = (end + SIGNATURE_ROOM + 2 * RECORD_HEADER_SIZE + 4095) // 4096 * 4096
    return IndexPlan(record, start, table_at, end, payload)


def _write_maps(f: BinaryIO, placed: Placements, base: dict[str, int],
                kinds: bytes | None) -> int:
    """Every regular file's data map then hash map, in inode order, each of
    the kind its inode was given (None: as columns without a head, the
    layout before MAP_KINDS); returns the bytes written."""
    written = 0
    for ino in placed.files():
        for tree in (TreeKind.DATA, TreeKind.HASH):
            first, end = placed.span(ino, tree)
            if end > first:
                kind = None if kinds is None else MapKind(kinds[2 * ino + tree])
                blob = _encode_map(kind, placed, first, end, base)
                f.write(blob)
                written += len(blob)
    return written


def _encode_map(kind: MapKind | None, placed: Placements, first: int, end: int,
                base: dict[str, int]) -> bytes:
    offsets, infos, crcs = [], [], []
    for slot in range(first, end):
        where = placed.at(slot)
        if where is None:
            offsets.append(0), infos.append(ABSENT), crcs.append(0)
            continue
        spool, rel, info, crc = where
        offsets.append(0 if info >> 14 == BlockKind.ZERO else base[spool] + rel)
        infos.append(info)
        crcs.append(crc)
    if kind is None:
        return encode_columns(offsets, infos, crcs)
    stored = [o for o, i in zip(offsets, infos) if i >> 14 != BlockKind.ZERO]
    base_offset = stored[0] if stored else 0
    if kind is not MapKind.FULL and list(run_offsets(base_offset, array("H", infos))) != offsets:
        raise ValueError("blocks moved after their map's kind was fixed")
    return encode_map(kind, base_offset, offsets, infos, crcs)


def _copy(f, fd: int, offset: int, length: int) -> None:
    src, done = f.fileno(), 0
    while done < length:
        n = os.copy_file_range(src, fd, length - done, done, offset + done)
        if n <= 0:
            raise OSError("copy_file_range made no progress")
        done += n


def _aligned(n: int) -> int:
    return (n + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
