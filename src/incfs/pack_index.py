"""Writing a packed image's metadata as an index (format 1.2): the inode
table, name blocks, block maps and heap of `format.index`, from the tree the
packer laid out.

Each region is spooled to a temporary file as it is made and copied into the
image once every region's size is known, so the index is never one byte
string in memory. The bytes depend only on the tree and the block placement,
so packing the same tree twice gives the same index (the signed root).
"""

from __future__ import annotations

import os
import stat
import struct
from array import array
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .blockmap import ABSENT
from .format.index import (FLAG_POSIX, HEADER_SIZE, INODE_SIZE, IndexHeader, Region,
                           RegionWriter, encode_inode, encode_map, encode_names, heap_blob,
                           map_size)
from .format.layout import RECORD_ALIGN, RECORD_HEADER_SIZE, RecordType
from .format.log import LogAppender
from .format.records import BlockKind, InodeEntry, needs_inodes2
from .integrity.merkle import TreeGeometry, block_count
from .pack_blocks import Placements
from .pack_links import LinkTable

# Room kept after the index for the SIGNATURE record (an RSA-4096 signature
# is 512 bytes) and the PAD header before the payload.
SIGNATURE_ROOM = 4096


@dataclass
class IndexPlan:
    """Where the index goes: `payload` is where the block payload will start."""

    record: int  # offset of the INDEX record
    start: int  # its first region byte
    end: int  # just past its last region byte
    payload: int


class _Children:
    """Each directory's links, grouped by a counting sort into one array of
    link numbers (4 bytes a link, where a dict of lists of (name, child)
    tuples cost about 90): a directory's sorted (name, child) list is made
    only when its name block is written."""

    def __init__(self, links: LinkTable, inode_count: int):
        self.links = links
        starts = array("I", bytes(4 * (inode_count + 2)))
        for parent in links.parents:
            starts[parent + 1] += 1
        for ino in range(1, inode_count + 2):
            starts[ino] += starts[ino - 1]
        fill = array("I", starts)
        order = array("I", bytes(4 * len(links)))
        for k, parent in enumerate(links.parents):
            order[fill[parent]] = k
            fill[parent] += 1
        self.starts, self.order = starts, order

    def of(self, ino: int) -> list[tuple[bytes, int]]:
        picked = self.order[self.starts[ino]:self.starts[ino + 1]]
        names = [(self.links.names[k], self.links.children[k]) for k in picked]
        names.sort()
        return names


def _link_counts(inodes: list[InodeEntry], links: LinkTable) -> array:
    """nlink as a log replay counts it: one per name, plus one per
    subdirectory for a directory (the mount adds the rest)."""
    counts = array("I", bytes(4 * (len(inodes) + 1)))
    for child, parent, _ in links:
        counts[child] += 1
        if stat.S_ISDIR(inodes[child - 1].mode):
            counts[parent] += 1
    return counts


def _tree_counts(e: InodeEntry) -> tuple[int, int]:
    if not stat.S_ISREG(e.mode):
        return 0, 0
    if e.size <= 4096:  # one block or none: no hash blocks (the common case)
        return (1 if e.size else 0), 0
    hashes = TreeGeometry(e.size).hash_blocks if int(e.flags) & 1 else 0
    return block_count(e.size), hashes


class _Spools:
    def __init__(self, tmpdir: Path):
        self.files = {name: tempfile.TemporaryFile(dir=tmpdir)
                      for name in ("names", "maps", "heap")}
        self.w = {name: RegionWriter(f) for name, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def write_index(fd: int, app: LogAppender, inodes: list[InodeEntry],
                links: LinkTable, placed: Placements, spool_rel: dict[str, int],
                tmpdir: Path) -> IndexPlan:
    """Append the INDEX record for the laid-out tree; `placed` gives
    (spool, offset in spool, info, crc) by (ino, tree, index) and `spool_rel`
    each spool's place inside the payload. Returns the plan (where the
    payload starts)."""
    spools = _Spools(tmpdir)
    try:
        extents, heaps = _names_and_heap(spools, inodes, links)
        map_extents, maps_len = _map_extents(inodes)
        plan = _plan(app.end, len(inodes), spools, maps_len)
        base = {name: plan.payload + rel for name, rel in spool_rel.items()}
        _write_maps(spools.w["maps"], inodes, placed, base)
        header = _header(plan, inodes, spools)
        _emit(fd, app, plan, header, inodes, links, extents, map_extents, heaps, spools)
        return plan
    finally:
        spools.close()


def _names_and_heap(spools: _Spools, inodes: list[InodeEntry],
                    links: LinkTable):
    """Name blocks and heap blobs; returns per-inode (by ino - 1) arrays of
    name-block offsets and counts, heap offsets and lengths (arrays: a
    million inodes cost 8 bytes each, not a dict entry)."""
    children = _Children(links, len(inodes))
    n = len(inodes)
    extents, counts = array("Q", bytes(8 * n)), array("I", bytes(4 * n))
    heaps, heap_lens = array("Q", bytes(8 * n)), array("I", bytes(4 * n))
    for i, e in enumerate(inodes):
        if stat.S_ISDIR(e.mode):
            names = children.of(e.ino)
            extents[i] = spools.w["names"].write(encode_names(names))
            counts[i] = len(names)
        if e.metadata or e.target or e.xattrs:
            blob = heap_blob(e)
            heaps[i], heap_lens[i] = spools.w["heap"].write(blob), len(blob)
    return (extents, counts), (heaps, heap_lens)


def _map_extents(inodes: list[InodeEntry]) -> tuple[array, int]:
    extents, cursor = array("Q", bytes(8 * len(inodes))), 0
    for i, e in enumerate(inodes):
        if stat.S_ISREG(e.mode):
            data, hashes = _tree_counts(e)
            extents[i] = cursor
            cursor += map_size(data) + map_size(hashes)
    return extents, cursor


def _plan(record: int, count: int, spools: _Spools, maps_len: int) -> IndexPlan:
    start = record + _aligned(RECORD_HEADER_SIZE + HEADER_SIZE)
    end = (start + count * INODE_SIZE + spools.w["names"].length + maps_len
           + spools.w["heap"].length)
    payload = (end + SIGNATURE_ROOM + 2 * RECORD_HEADER_SIZE + 4095) // 4096 * 4096
    return IndexPlan(record, start, end, payload)


def _write_maps(w: RegionWriter, inodes: list[InodeEntry], placed: Placements,
                base: dict[str, int]) -> None:
    for e in inodes:
        if not stat.S_ISREG(e.mode):
            continue
        for tree, n in enumerate(_tree_counts(e)):
            if n == 1:  # most files: one block, 14 bytes (+2 of padding)
                w.write(_one_block(placed.get(e.ino, tree, 0), base))
                continue
            offsets, infos, crcs = [], [], []
            for i in range(n):
                where = placed.get(e.ino, tree, i)
                if where is None:
                    offsets.append(0), infos.append(ABSENT), crcs.append(0)
                    continue
                spool, rel, info, crc = where
                zero = info >> 14 == BlockKind.ZERO
                offsets.append(0 if zero else base[spool] + rel)
                infos.append(info)
                crcs.append(crc)
            w.write(encode_map(offsets, infos, crcs))


_ONE = struct.Struct("<QHIxx")


def _one_block(where, base: dict[str, int]) -> bytes:
    if where is None:
        return _ONE.pack(0, ABSENT, 0)
    spool, rel, info, crc = where
    return _ONE.pack(0 if info >> 14 == BlockKind.ZERO else base[spool] + rel, info, crc)


def _header(plan: IndexPlan, inodes: list[InodeEntry], spools: _Spools) -> IndexHeader:
    at = plan.start
    regions = {"inodes": Region(at, len(inodes) * INODE_SIZE, 0)}
    at += regions["inodes"].length
    for name in ("names", "maps", "heap"):
        regions[name] = spools.w[name].region(at)
        at = regions[name].end
    files = total = 0
    posix = False
    for i, e in enumerate(inodes):
        if e.ino != i + 1:
            raise ValueError("an index needs inodes numbered 1..N in order")
        data, hashes = _tree_counts(e)
        files += stat.S_ISREG(e.mode)
        total += data + hashes
        posix = posix or needs_inodes2(e)
    return IndexHeader(len(inodes), total, files, FLAG_POSIX if posix else 0, regions)


def _emit(fd: int, app: LogAppender, plan: IndexPlan, header: IndexHeader,
          inodes: list[InodeEntry], links, extents, map_extents, heaps,
          spools: _Spools) -> None:
    """The inode table goes straight into the image; then the spooled
    regions are copied in and the record header (with the final CRCs)
    written last."""
    nlinks = _link_counts(inodes, links)
    parents = array("Q", bytes(8 * (len(inodes) + 1)))
    for child, parent, _ in links:
        if stat.S_ISDIR(inodes[child - 1].mode):
            parents[child] = parent  # a directory's one parent
    table = RegionWriter(_PositionalFile(fd, plan.start))
    for i, e in enumerate(inodes):
        extent, count, hashes = extents[0][i], extents[1][i], 0
        if stat.S_ISREG(e.mode):
            extent, (count, hashes) = map_extents[i], _tree_counts(e)
        elif stat.S_ISLNK(e.mode):
            count = len(e.target)
        heap, heap_len = heaps[0][i], heaps[1][i]
        parent = parents[e.ino]
        table.write(encode_inode(e, nlinks[e.ino], parent, extent, count, hashes, heap,
                                 heap_len))
    regions = dict(header.regions, inodes=table.region(plan.start))
    for name in ("names", "maps", "heap"):
        _copy(spools.files[name], fd, regions[name].offset, regions[name].length)
    final = IndexHeader(header.inode_count, header.total_blocks, header.files, header.flags,
                        regions)
    at = app.begin_record(RecordType.INDEX, final.encode(), plan.end - plan.start)
    assert at == plan.start, (at, plan.start)
    if os.fstat(fd).st_size < app.end:
        os.ftruncate(fd, app.end)  # the record's alignment padding


class _PositionalFile:
    """The little of a file object RegionWriter needs, writing at `base` of fd."""

    def __init__(self, fd: int, base: int):
        self.fd, self.base, self.pos = fd, base, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def write(self, blob: bytes) -> None:
        os.pwrite(self.fd, blob, self.base + self.pos)
        self.pos += len(blob)

    def flush(self) -> None:
        pass


def _copy(f, fd: int, offset: int, length: int) -> None:
    f.flush()
    src, done = f.fileno(), 0
    while done < length:
        n = os.copy_file_range(src, fd, length - done, done, offset + done)
        if n <= 0:
            raise OSError("copy_file_range made no progress")
        done += n


def _aligned(n: int) -> int:
    return (n + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
