"""Data blocks leaving a cache image: replaying RELEASED records, and the two
ways blocks are released online. Only caches (the CACHE flag, blocks whose
place in the source is known) ever release: a block released there can be
fetched again. A user's own image is never touched.

Crash ordering (docs/reliability.md):

* to the plain copy (`release_to_plain`): the plain file is written, fsynced,
  renamed and its directory fsynced by passthrough first; then the RELEASED
  record is appended and fdatasync'ed; only then are the image's bytes
  punched. A crash before the record: the image still holds the blocks. A
  crash after it: the blocks are read from the plain copy (checked against
  the Merkle tree), and bytes left unpunched are dead space for gc.
* evicted (`evict`, the cache cap; gc's nameless files): the same, record
  fdatasync'ed before the punch, so even after a power cut no live map names
  a hole (one sync per release batch, not per block). Were a punch ever to
  outlive its record, the old map would name zeros, which fail the block's
  checks: dropped and fetched again, never served. Holes are never reused:
  new data is always appended, so a stale map can never name new bytes.
"""

from __future__ import annotations

from ..errors import CorruptImage
from ..format.layout import RecordType, SuperFlags
from ..format.records import BlockKind, block_info, info_kind, info_size
from ..verified_read import plain_size
from . import punch as holes
from .plainfiles import is_plain, plain_offset
from .records import ReleasedRun, Where, decode_released, encode_released


def apply(image, body: bytes) -> None:
    """Replay one RELEASED record (Image._apply)."""
    for run in decode_released(body):
        node = image.ns.inodes.get(run.ino)
        if node is None or node.data is None:
            raise CorruptImage(f"RELEASED names inode {run.ino}, which is not a file")
        if run.first + run.count > node.data.count:
            raise CorruptImage(f"RELEASED runs past the end of inode {run.ino}")
        if run.where == Where.PLAIN and not node.has_tree:
            raise CorruptImage(f"RELEASED moves inode {run.ino} to a plain copy, but it "
                               "has no Merkle tree to check that copy against")
        mark(image, node, run)


def mark(image, node, run: ReleasedRun) -> int:
    """Apply a run in memory; returns how many blocks stopped being in the
    image."""
    image.ns.pin(node)  # its map changes: an index no longer describes it
    bmap, moved = node.data, 0
    for i in range(run.first, run.first + run.count):
        loc = bmap.get(i)
        if run.where == Where.GONE:
            moved += bmap.forget(i)
        elif loc is None:
            bmap.set(i, plain_offset(i), block_info(BlockKind.RAW, plain_size(node, i)), 0)
        elif info_kind(loc[1]) is not BlockKind.ZERO and not is_plain(loc[0]):
            bmap.move(i, plain_offset(i), block_info(BlockKind.RAW, plain_size(node, i)), 0)
            moved += 1
    if run.where == Where.PLAIN:
        image.plain_inos.add(node.ino)
    return moved


def check_plain_copies(image) -> None:
    """After replay: a file whose plain copy is gone or the wrong size loses
    those blocks (absent: fetched again, or EIO offline). A copy with wrong
    bytes is caught block by block by the Merkle check on read."""
    for ino in sorted(image.plain_inos):
        node = image.ns.inodes.get(ino)
        if node is not None and not image.plain.usable(node):
            drop_plain(image, node)


def drop_plain(image, node) -> int:
    """Forget every block of `node` that lives in its plain copy; a refill is
    then written as a REPLACES record (it must win over the RELEASED one on
    the next open)."""
    image.ns.pin(node)
    dropped = 0
    for i, offset, _info, _crc in list(node.data.entries()):
        if is_plain(offset) and node.data.forget(i):
            dropped += 1
            if image.writable:
                image._forgotten.add((node.ino, 0, i))
    image.plain_inos.discard(node.ino)
    image.plain.forget(node.ino)
    return dropped


def releasable(image, node) -> bool:
    """Blocks of `node` may leave this image: a writable cache that knows
    where they are in its source."""
    return (image.writable and image.appender is not None and node.data is not None
            and bool(image.superblock.flags & SuperFlags.CACHE)
            and node.ino in image.source_maps)


def stored_ranges(node, first: int, stop: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes in the image of data blocks [first, stop)."""
    out = []
    for i in range(first, min(stop, node.data.count)):
        loc = node.data.get(i)
        if loc is not None and info_kind(loc[1]) is not BlockKind.ZERO and not is_plain(loc[0]):
            out.append((loc[0], info_size(loc[1])))
    return out


def punch_ranges(fd: int, ranges: list[tuple[int, int]]) -> int:
    return sum(holes.punch(fd, offset, length) for offset, length in holes.merge(ranges))


def release_to_plain(image, node) -> int:
    """Move a complete file's blocks to its plain copy, which the caller has
    made durable and verified. Returns the bytes punched (0: nothing to do
    or not allowed here). The caller holds the image's writer lock."""
    if not releasable(image, node) or not node.has_tree or not node.complete:
        return 0
    ranges = stored_ranges(node, 0, node.data.count)
    if not ranges:
        return 0
    run = ReleasedRun(node.ino, 0, node.data.count, Where.PLAIN)
    image.appender.append(RecordType.RELEASED, encode_released([run]))
    image.appender.sync()  # durable before a single byte is punched
    mark(image, node, run)
    return punch_ranges(image.fd, ranges)


def evict(image, chunks: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Give up data blocks [first, stop) of each (ino, first, stop): one
    RELEASED record, then the punches. Returns (blocks, bytes punched)."""
    runs, ranges = [], []
    for ino, first, stop in chunks:
        node = image.ns.inodes.get(ino)
        if node is None or not releasable(image, node):
            continue
        found = stored_ranges(node, first, stop)
        if found:
            runs.append(ReleasedRun(ino, first, stop - first, Where.GONE))
            ranges += found
    if not runs:
        return 0, 0
    image.appender.append(RecordType.RELEASED, encode_released(runs))
    image.appender.sync()  # no live map may name a hole, power cut or not
    blocks = sum(mark(image, image.ns.inodes[r.ino], r) for r in runs)
    return blocks, punch_ranges(image.fd, ranges)
