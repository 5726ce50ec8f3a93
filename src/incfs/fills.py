"""Accepting blocks from loaders: the writing half of `Image` (mixed into it,
as `VerifiedReads` is its reading half).

A block handed in is decoded, checked against its file's Merkle tree (hash
blocks top level first, so one batch can carry a whole path from the root
down) and only then appended: the bytes in one DATA record, their places in
one BLOCKS record, synced before the fill returns. A block that fails is
refused with its reason and never stored.
"""

from __future__ import annotations

import errno
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Collection, Iterable, NamedTuple

from . import BLOCK_SIZE, codec
from .errors import CorruptImage, IntegrityError, os_error
from .format import records
from .format.layout import RecordFlags, RecordType
from .format.records import BlockKind, BlockRun, TreeKind, block_info, info_kind, info_size
from .integrity import merkle
from .namespace import Inode
from .verified_read import MissingBlock, plain_size

# A compressed block as sent may be a little larger than the 4 KiB it encodes
# (incompressible data: LZ4 adds ~18 bytes, zstd ~10); it is accepted and
# stored raw. The bound keeps hostile input small (output is bounded anyway).
MAX_SENT_BLOCK = 2 * BLOCK_SIZE


class FillBlock(NamedTuple):
    """One block handed in by a loader: stored bytes and how they are encoded."""

    index: int
    data: bytes
    kind: BlockKind = BlockKind.RAW
    tree: TreeKind = TreeKind.DATA


@dataclass
class FillResult:
    stored: int = 0  # newly stored blocks
    already: int = 0  # present before: a silent no-op
    errors: list[tuple[int, int, str]] = field(default_factory=list)  # (index, errno, why)
    leaves_built: list[int] = field(default_factory=list)  # leaf hash blocks built and stored
    leaves_refused: list[int] = field(default_factory=list)  # built ones that failed their check


# A block handed in, decoded: its plain bytes and, for data, their hash.
Decoded = tuple[bytes, bytes | None]


class Fills:
    """Mixed into Image, which provides ns, appender, durable, writable,
    counters, source_maps, hash_block, _hash_lock, _hash_cache and
    _forgotten."""

    def fill(self, ino: int, blocks: Iterable[FillBlock],
             leaves: Collection[int] = ()) -> FillResult:
        """Verify and store blocks of one file; present blocks are a no-op.

        Hash-tree blocks are taken top level first, so one batch can carry a
        whole path from the root down to the data it verifies. A block that
        fails is reported in `errors` and never stored; the rest still are.

        `leaves`: leaf (level-0) hash blocks to build rather than be handed
        in. One that is absent and whose every data block is in the batch is
        built from the data's hashes and checked against its parent exactly
        as a fetched one is, so it holds only if all that data is the signed
        data (then the data verify against it). A built leaf that fails is
        not stored and is named in `leaves_refused`; the data under it are then
        refused (ENODATA), as without it. Loaders save the leaf's bytes on
        the wire: 32 per 4 KiB block.
        """
        node = self.ns.get(ino)
        if node.data is None:
            raise os_error(errno.EINVAL, f"inode {ino} is not a regular file")
        self.ns.pin(node)  # fills change its maps: keep this very object
        blocks = list(blocks)
        known: dict[int, Decoded] = {}  # id(block) -> decoded while building leaves
        built_leaves = self._build_leaves(node, blocks, set(leaves), known) if leaves else []
        built = {id(b) for b in built_leaves}
        result = FillResult()
        accepted: list[tuple[FillBlock, bytes]] = []
        staged: dict[int, bytes] = {}
        for blk in sorted(blocks + built_leaves, key=lambda b: (-int(b.tree), b.index)):
            status = self._check_fill(node, blk, staged, known.get(id(blk)))
            if status is None:
                result.already += 1
            elif isinstance(status, tuple):
                if id(blk) in built:
                    result.leaves_refused.append(blk.index)
                else:
                    result.errors.append((blk.index, *status))
            else:
                accepted.append((blk, status))
                if id(blk) in built:
                    result.leaves_built.append(blk.index)
        if accepted:
            self._store(node, accepted)
            result.stored = len(accepted)
        return result

    def _build_leaves(self, node: Inode, blocks: list[FillBlock], wanted: set[int],
                      known: dict[int, Decoded]) -> list[FillBlock]:
        """The `wanted` leaf hash blocks that are absent and whose every data
        block is in `blocks`, built from those blocks (unchecked: `fill` checks them). What is
        decoded on the way goes to `known`, so it is not decoded twice."""
        if not node.has_tree or node.hashes is None or not node.geometry.levels:
            return []
        geo = node.geometry
        wanted = wanted - {b.index for b in blocks if b.tree == TreeKind.HASH}  # sent anyway
        groups: dict[int, dict[int, FillBlock]] = {}
        for blk in blocks:
            if blk.tree == TreeKind.DATA and 0 <= blk.index < node.data.count:
                leaf = geo.leaf_of(blk.index)
                if leaf in wanted and not node.hashes.is_present(leaf):
                    # the first copy of an index is the one kept (see fill)
                    groups.setdefault(leaf, {}).setdefault(blk.index, blk)
        leaves = []
        for leaf, group in groups.items():
            under = geo.leaf_group(leaf)
            if len(group) != len(under):
                continue  # not all of its data is here
            hashes = []
            for i in under:
                decoded = self._decode_sent(node, group[i])
                if isinstance(decoded, tuple):
                    break  # refused on its own below; the leaf is fetched
                digest = merkle.hash_block(decoded)
                known[id(group[i])] = (decoded, digest)
                hashes.append(digest)
            else:
                leaves.append(FillBlock(leaf, merkle.leaf_block(hashes), BlockKind.RAW,
                                        TreeKind.HASH))
        return leaves

    def _decode_sent(self, node: Inode, blk: FillBlock) -> bytes | tuple[int, str]:
        """The plain bytes of a block handed in, or (errno, why)."""
        size = plain_size(node, blk.index) if blk.tree == TreeKind.DATA else BLOCK_SIZE
        if blk.kind is BlockKind.RAW and len(blk.data) != size:
            return errno.EINVAL, f"raw block is {len(blk.data)} bytes, expected {size}"
        if len(blk.data) > MAX_SENT_BLOCK:
            return errno.EINVAL, f"stored block larger than {MAX_SENT_BLOCK} bytes"
        try:
            return codec.decompress(blk.kind, blk.data, size)
        except CorruptImage as e:
            return errno.EBADMSG, str(e)

    def _check_fill(self, node: Inode, blk: FillBlock, staged: dict[int, bytes],
                    known: Decoded | None = None):
        """None: already present; (errno, why): refused; bytes: plain content."""
        target = node.data if blk.tree == TreeKind.DATA else node.hashes
        if target is None:
            return errno.EINVAL, "file has no hash tree"
        if not 0 <= blk.index < target.count:
            return errno.EINVAL, f"block index {blk.index} is past the end"
        if blk.index > 0xFFFFFFFF:  # a block map run names its first block in a u32
            return errno.EFBIG, f"block index {blk.index} is beyond 2^32 (16 TiB)"
        if target.is_present(blk.index):
            return None
        plain, digest = known if known is not None else (self._decode_sent(node, blk), None)
        if isinstance(plain, tuple):
            return plain
        try:
            self._verify_fill(node, blk, plain, staged, digest)
        except IntegrityError as e:
            self.counters["verify_failures"] += 1
            return errno.EBADMSG, str(e)
        except MissingBlock as e:
            return errno.ENODATA, f"verifying needs hash block {e.index} first"
        if blk.tree == TreeKind.HASH:
            staged[blk.index] = plain
        return plain

    def _verify_fill(self, node: Inode, blk: FillBlock, plain: bytes,
                     staged: dict[int, bytes], digest: bytes | None = None) -> None:
        """Check a block against its file's tree; `digest`: its hash, when
        already computed from these very bytes."""
        if not node.has_tree:
            return
        get = lambda s: staged.get(s) or self.hash_block(node, s)  # noqa: E731
        try:
            if blk.tree == TreeKind.DATA:
                want = merkle.expected_hash(node.geometry, node.root_hash, -1, blk.index, get)
                got = digest or merkle.hash_block(plain)
            else:
                level, index = node.geometry.level_of(blk.index)
                want = merkle.expected_hash(node.geometry, node.root_hash, level, index, get)
                got = hashlib.sha256(plain).digest()
        except merkle.MissingHashBlock as e:
            raise MissingBlock(node.ino, TreeKind.HASH, e.storage_index) from None
        if got != want:
            raise IntegrityError(f"{blk.tree.name.lower()} block {blk.index} "
                                 "does not match the file's Merkle tree")

    def _store(self, node: Inode, accepted: list[tuple[FillBlock, bytes]]) -> None:
        """Append the blocks as one DATA record plus one BLOCKS record."""
        base = self.appender.payload_base()
        payload, runs, placed = bytearray(), [], []
        cursor = base
        for blk, plain in accepted:
            kind, stored = _store_form(blk, plain)
            offset, cursor = records.place_block(cursor, kind, len(stored))
            if kind is not BlockKind.ZERO:
                gap = offset - base - len(payload)  # (a raw block's 4 KiB alignment)
                if gap:
                    payload += bytes(gap)
                payload += stored
            info = block_info(kind, len(stored))
            crc = zlib.crc32(stored)
            runs.append(BlockRun(node.ino, blk.tree, blk.index, offset, [(info, crc)]))
            placed.append((blk.tree, blk.index, offset, info, crc))
        if payload:
            self.appender.write_data(payload)
        repairs = ({(node.ino, int(t), i) for t, i, *_ in placed} & self._forgotten
                   if self._forgotten else set())
        flags = RecordFlags.REPLACES if repairs else 0
        self.appender.append(RecordType.BLOCKS, records.encode_runs(merge_runs(runs)), flags)
        if self.durable:
            self.appender.sync()
        self._forgotten -= repairs
        for tree, index, offset, info, crc in placed:
            target = node.data if tree == TreeKind.DATA else node.hashes
            target.set(index, offset, info, crc)
        self.counters["blocks_stored"] += len(placed)
        self.counters["bytes_stored"] += len(payload)

    def forget_block(self, ino: int, tree: int, index: int) -> bool:
        """Turn a bad stored block of a cache back into a hole, so a loader
        fetches it again (a power cut can keep a block's map record but lose
        its bytes). Only for writable caches that know where the block lives
        in their source; the refill is written as a REPLACES record so the
        next open prefers it to the stale mapping. False when not possible."""
        node = self.ns.inodes.get(ino)
        source = self.source_maps.get(ino)
        if not self.writable or node is None or source is None:
            return False
        tree = TreeKind(tree)
        target, where = ((node.data, source[0]) if tree == TreeKind.DATA
                         else (node.hashes, source[1]))
        if target is None or where is None or where.get(index) is None:
            return False
        self.ns.pin(node)
        if tree == TreeKind.HASH:
            with self._hash_lock:
                self._hash_cache.pop((ino, index), None)
        if not target.forget(index):
            return False
        self._forgotten.add((ino, int(tree), index))
        return True


def _store_form(blk: FillBlock, plain: bytes) -> tuple[BlockKind, bytes]:
    """Keep what the loader sent (no recompression), but never spend space on
    zeros or on "compressed" blocks that did not shrink."""
    if codec.is_zero(plain):
        return BlockKind.ZERO, b""
    if blk.kind is not BlockKind.RAW and len(blk.data) >= len(plain):
        return BlockKind.RAW, plain
    return blk.kind, blk.data


def merge_runs(runs: list[BlockRun]) -> list[BlockRun]:
    """Join single-block runs that continue each other into longer runs (same
    file and tree, consecutive indexes, offsets following the placement rule)."""
    merged: list[BlockRun] = []
    end = 0  # where the last merged run ends (kept as we go: O(n), not O(n^2))
    for run in runs:
        last = merged[-1] if merged else None
        if last and last.tree == run.tree and last.first + len(last.blocks) == run.first:
            info = run.blocks[0][0]
            offset, next_end = records.place_block(end, info_kind(info), info_size(info))
            if offset == run.base or info_kind(info) is BlockKind.ZERO:
                last.blocks.extend(run.blocks)
                end = next_end
                continue
        merged.append(run)
        end = _run_end(run)
    return merged


def _run_end(run: BlockRun) -> int:
    cursor = run.base
    for info, _ in run.blocks:
        _, cursor = records.place_block(cursor, info_kind(info), info_size(info))
    return cursor
