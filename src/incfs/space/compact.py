"""`incfs compact IMAGE [OUT]`: the same image rewritten without dead space
(released and superseded blocks, nameless files, replaced records, holes).

Built only from what an open `Image` exposes and written only through
Image's own writers (add_inodes, add_links, fill), so a change of the
on-disk metadata format is picked up here without edits. Every block copied
is verified again on the way in (fill checks it against the Merkle tree),
so compaction never copies a bad block: it is left out and counted.

Crash safety: the new image is written under a temporary name beside OUT,
fsynced, renamed over OUT and the directory fsynced; until the rename OUT
(or IMAGE, in place) is untouched. The input is locked like a writer would
lock it, so a mount cannot use it meanwhile.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .. import BLOCK_SIZE, ROOT_INO
from ..errors import UsageError
from ..format.layout import (LOG_START, RECORD_HEADER_SIZE, RecordHeader, RecordType,
                            Superblock, SuperFlags)
from ..format.records import (BlockKind, BlockRun, InodeEntry, TreeKind, encode_runs,
                              encode_signature, info_kind, info_size)
from ..fills import merge_runs
from ..image import FillBlock, Image
from ..verified_read import plain_size
from .plainfiles import is_plain
from .records import ReleasedRun, Where, encode_released

BATCH = 1024  # blocks per fill, inodes and names per record batch


@dataclass
class CompactResult:
    size_before: int = 0  # allocated bytes (st_blocks * 512)
    size_after: int = 0
    inodes_dropped: int = 0
    blocks_copied: int = 0
    blocks_bad: int = 0  # failed verification: left out
    signature: str = "none"  # "kept", "dropped (names changed after signing)" or "none"


def compact(image_path: Path, out_path: Path | None = None) -> CompactResult:
    image_path = Path(image_path)
    out = Path(out_path) if out_path else image_path
    in_place = _same_file(image_path, out)
    if out.exists() and not in_place:
        raise UsageError(f"{out} already exists")
    src = Image.open(image_path)
    try:
        _lock(src)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.compact")
        try:
            result = _write(src, tmp, keep_plain=in_place)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(out.parent)
        result.size_after = os.stat(out).st_blocks * 512
        return result
    finally:
        src.close()


def _write(src: Image, tmp: Path, keep_plain: bool) -> CompactResult:
    result = CompactResult(size_before=os.fstat(src.fd).st_blocks * 512)
    dst = Image.create(tmp, superblock=_superblock(src.superblock))
    try:
        dst.durable = False  # one fsync at the end
        live = _live_inodes(src)
        result.inodes_dropped = len(src.ns.inodes) - len(live)
        index = _keeps_index(src)
        if index:
            dst = _with_index(src, dst, tmp)
        else:
            _copy_namespace(src, dst, live)
        result.signature = _copy_signature(src, dst)
        for ino in live:
            node = src.ns.inodes[ino]
            if node.data is not None:
                if not index:  # an index holds a cache's source maps itself
                    _copy_source_maps(src, dst, ino)
                _copy_blocks(src, dst, node, keep_plain, result)
        os.fsync(dst.fd)
    finally:
        dst.close()
    return result


def _superblock(sb: Superblock) -> Superblock:
    """A cache keeps its source's region fields; a packed image's are about a
    layout the rewrite does not have, so it becomes a plain log image."""
    if sb.flags & SuperFlags.CACHE:
        return sb
    return Superblock(uuid=sb.uuid, flags=SuperFlags(int(sb.flags) & ~int(SuperFlags.PACKED)),
                      version_major=sb.version_major, version_minor=sb.version_minor)


def _keeps_index(src: Image) -> bool:
    """A cache whose index (format 1.2) no later record changed keeps that
    INDEX record as it is: the same tree, the same signed root, and its maps
    still say where each block is in the source."""
    return (src.index is not None and bool(src.superblock.flags & SuperFlags.CACHE)
            and not getattr(src.ns, "changed", True))


def _with_index(src: Image, dst: Image, tmp: Path) -> Image:
    """Copy src's INDEX record (the first record) into the empty dst and
    reopen dst so it serves from it; returns the reopened image."""
    header = RecordHeader.decode(os.pread(src.fd, RECORD_HEADER_SIZE, LOG_START))
    done = 0
    while done < header.length:
        n = os.copy_file_range(src.fd, dst.fd, header.length - done, LOG_START + done,
                               LOG_START + done)
        if n <= 0:
            raise OSError("copy_file_range made no progress")
        done += n
    dst.close()
    reopened = Image.open(tmp, writable=True)
    reopened.durable = False
    return reopened


def _live_inodes(src: Image) -> list[int]:
    """Inodes some name reaches (and the root), in number order."""
    return sorted({ROOT_INO} | {node.ino for _path, node in src.ns.walk()})


def _entry(node) -> InodeEntry:
    return InodeEntry(node.ino, node.mode, node.size, node.mtime_ns, node.file_id,
                      node.root_hash, node.flags, node.metadata, node.target, node.uid,
                      node.gid, node.rdev, tuple(sorted(node.xattrs.items())))


def _copy_namespace(src: Image, dst: Image, live: list[int]) -> None:
    for i in range(0, len(live), BATCH):
        dst.add_inodes([_entry(src.ns.inodes[ino]) for ino in live[i:i + BATCH]])
    links, seen = [], set()
    for _path, node in src.ns.walk():  # parents come before their children
        if node.is_dir and node.ino not in seen:
            seen.add(node.ino)
            links += [(child, node.ino, name) for name, child in sorted(node.children.items())]
    for i in range(0, len(links), BATCH):
        dst.add_links(links[i:i + BATCH])


def _copy_signature(src: Image, dst: Image) -> str:
    if src.signature is None:
        return "none"
    entry = src.signature.entry
    if dst.canonical_root() != entry.root:
        return "dropped (the tree differs from the one signed)"
    dst._append(RecordType.SIGNATURE, encode_signature(entry))
    return "kept"


def _copy_source_maps(src: Image, dst: Image, ino: int) -> None:
    maps = src.source_maps.get(ino)
    if maps is None:
        return
    runs = []
    for tree, bmap in ((TreeKind.DATA, maps[0]), (TreeKind.HASH, maps[1])):
        if bmap is not None:
            runs += [BlockRun(ino, tree, i, offset, [(info, _source_crc(ino, crc))])
                     for i, offset, info, crc in bmap.entries()]
    if runs:
        dst._append(RecordType.SOURCE_BLOCKS, encode_runs(merge_runs(runs)))


def _source_crc(ino: int, crc: int | None) -> int:
    """SOURCE_BLOCKS records give each block's CRC; an index's compact maps
    (format.maps RUN, RAW) hold none, and without the source's bytes there
    is none to compute. Refused before anything is written: the cache stays
    as it is and keeps working."""
    if crc is None:
        raise UsageError(f"cannot compact this cache: its tree changed since its index was "
                         f"written, and the index gives no CRCs for file {ino}'s source blocks "
                         "to carry over; it keeps working as it is")
    return crc


def _copy_blocks(src: Image, dst: Image, node, keep_plain: bool, result: CompactResult) -> None:
    """Hash blocks first (the data is verified against them), then data."""
    plain = keep_plain and node.ino in src.plain_inos
    for tree, bmap in ((TreeKind.HASH, node.hashes), (TreeKind.DATA, node.data)):
        if bmap is None:
            continue
        batch: list[FillBlock] = []
        for i, offset, info, _crc in bmap.entries():
            if plain and is_plain(offset):
                continue
            batch.append(_fill_block(src, node, tree, i, offset, info))
            if len(batch) == BATCH:
                _fill(dst, node.ino, batch, result)
                batch = []
        _fill(dst, node.ino, batch, result)
    if plain:  # in place: the plain copy beside it still holds those bytes
        run = ReleasedRun(node.ino, 0, node.data.count, Where.PLAIN)
        dst._append(RecordType.RELEASED, encode_released([run]))


def _fill_block(src: Image, node, tree: TreeKind, index: int, offset: int, info: int) -> FillBlock:
    kind = info_kind(info)
    size = plain_size(node, index) if tree == TreeKind.DATA else BLOCK_SIZE
    if kind is BlockKind.ZERO:
        return FillBlock(index, bytes(size), BlockKind.RAW, tree)
    return FillBlock(index, src.stored_bytes(node, offset, info_size(info)), kind, tree)


def _fill(dst: Image, ino: int, batch: list[FillBlock], result: CompactResult) -> None:
    if batch:
        outcome = dst.fill(ino, batch)
        result.blocks_copied += outcome.stored
        result.blocks_bad += len(outcome.errors)


def _lock(src: Image) -> None:
    try:
        fcntl.flock(src.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{src.path} is in use by another incfs process") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

