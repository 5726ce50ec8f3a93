"""Updates from older images (R9): blocks with the same SHA-256 are copied
from an older local image instead of fetched.

The hash of a block of the new image is known without its data: it is in
the file's level-0 hash block, so with an older image to copy from the
loader gets hash blocks first (`ReuseMixin._hash_first`), then copies every
data block the older image has (`bytes_reused`); only the rest is fetched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from .. import BLOCK_SIZE
from ..errors import CorruptImage, IncfsError, IntegrityError
from ..format.records import BlockKind, TreeKind, info_kind, info_size
from ..image import FillBlock, Image, MissingBlock
from ..integrity import merkle
from ..space.plainfiles import is_plain
from .plan import DATA, HASH, Job, Want, plan_ranges

log = logging.getLogger("incfs.loader")


def leaf_digest(image: Image, node, index: int) -> bytes | None:
    """SHA-256 a data block must have, from the file's verified level-0 hash
    block (None when that is absent or bad)."""
    if not node.has_tree:
        return None
    geo = node.geometry
    if geo.levels == 0:
        return node.root_hash
    storage, offset = geo.locate(-1, index)
    try:
        block = image.hash_block(node, storage)
    except (IntegrityError, MissingBlock, OSError, CorruptImage):
        return None
    if block is None:
        return None
    return bytes(block[offset:offset + merkle.HASH_SIZE])


def index_blocks(image: Image) -> dict[int, int]:
    """Present data blocks of an image by content: first 8 bytes of their
    SHA-256 -> (offset << 16 | info) of the stored bytes. The hash comes from
    the image's level-0 hash blocks where present, else from the block.
    (Collisions only cost a failed fill: every copied block is verified.)"""
    index: dict[int, int] = {}
    for node in list(image.ns.inodes.values()):
        if node.data is None or not node.data.present:
            continue
        for i, offset, info, crc in node.data.entries():
            if info_kind(info) is BlockKind.ZERO:
                continue
            digest = leaf_digest(image, node, i)
            if digest is None:
                size = min(BLOCK_SIZE, node.size - i * BLOCK_SIZE)
                try:
                    plain = image._load(node, TreeKind.DATA, i, (offset, info, crc), size)
                except (IntegrityError, OSError, CorruptImage):
                    continue
                digest = merkle.hash_block(plain)
            # a block in a plain copy is read through its file (incfs.space)
            where = (node.ino, offset, info) if is_plain(offset) else offset << 16 | info
            index.setdefault(int.from_bytes(digest[:8], "little"), where)
    return index


class ReuseMixin:
    """The Loader's part that copies from `self.base` (an older image).

    Relies on the Loader's image, service, info, stats, cfg, `_fetch`,
    `_store`, `_present`, `_plan` and `_release`."""

    base: Image | None
    base_index: dict[int, int]

    async def _base_indexed(self) -> None:
        """Wait (at most `base_wait` from the start) until the older image,
        if there is one, is open and indexed: a read that came first would
        fetch blocks it holds."""
        if not self._base_ready.is_set():
            with trio.move_on_at(self._started_at + self.cfg.base_wait):
                await self._base_ready.wait()

    async def _open_base(self) -> None:
        try:
            await self._open_base_now()
        finally:
            self._base_ready.set()

    async def _open_base_now(self) -> None:
        path = self.info.get("base") or getattr(self.config, "base_cache", None)
        if not path or not Path(path).exists():
            return
        try:
            base = await trio.to_thread.run_sync(lambda: Image.open(path))
        except (IncfsError, OSError) as e:
            log.warning("cannot use %s as a base: %s", path, e)
            self.info["base"] = None
            return
        self.info["base"] = str(path)
        self.prefetch_state = "indexing base"
        self.base_index = await trio.to_thread.run_sync(index_blocks, base)
        self.base = base

    def _close_base(self) -> None:
        if self.base is not None:
            self.base.close()
            self.base = None

    async def _hash_first(self, node, job: Job, wants: list[Want]) -> list[Want]:
        """With an older image to copy from, get the hash blocks first: they
        tell which data blocks the older image already has. (One more round
        trip for a miss, against not downloading reusable data.)"""
        hashes = [w for w in wants if w.tree == HASH]
        if not hashes or not any(w.tree == DATA and w.size for w in wants):
            return wants
        max_len = self.cfg.prefetch_chunk if job.prefetch else self.cfg.amplify
        got, _bad = await self._fetch(job, plan_ranges(hashes, max_len, self.cfg.max_gap))
        await self._store(node, job, got)
        # whatever failed stays absent and claimed: fetched again with the rest
        return [w for w in wants if not self._present(node, w.tree, w.index)]

    async def _reuse(self, node, job: Job, wants: list[Want]) -> list[Want]:
        """Copy data blocks whose hash (known from present level-0 hash
        blocks) matches a block of the base image; returns the rest."""
        candidates = [w for w in wants if w.tree == DATA and w.size]
        if not candidates or self.base is None:
            return wants
        hits = await trio.to_thread.run_sync(self._reuse_lookup, node, candidates)
        if not hits:
            return wants
        blocks = [blk for _, blk in hits]
        result = await self.service.fill(node.ino, blocks, reused=True)
        errors = {index for index, _code, _why in result.errors}
        done = set()
        stored_keys = []
        for w, blk in hits:
            if w.index not in errors and self._present(node, DATA, w.index):
                done.add(w.index)
                stored_keys.append((node.ino, DATA, w.index))
                self.stats["blocks_reused"] += 1
                self.stats["bytes_reused"] += len(blk.data)
        self._release(job, stored_keys)
        return [w for w in wants if not (w.tree == DATA and w.index in done)]

    def _reuse_lookup(self, node, wants: list[Want]) -> list[tuple[Want, FillBlock]]:
        out = []
        with self.service.image_lock:
            for w in wants:
                digest = leaf_digest(self.image, node, w.index)
                if digest is None:
                    continue
                hit = self.base_index.get(int.from_bytes(digest[:8], "little"))
                if hit is None:
                    continue
                try:
                    stored, info = self._base_stored(hit)
                except OSError:
                    continue
                out.append((w, FillBlock(w.index, stored, info_kind(info), TreeKind.DATA)))
        return out

    def _base_stored(self, hit) -> tuple[bytes, int]:
        if isinstance(hit, tuple):  # in the base's plain copy of a file
            ino, offset, info = hit
            return self.base.stored_bytes(self.base.ns.inodes[ino], offset, info_size(info)), info
        offset, info = hit >> 16, hit & 0xFFFF
        return os.pread(self.base.fd, info_size(info), offset), info

    async def _reuse_pass(self) -> None:
        """Get every hash block, then copy every data block the base has."""
        self.prefetch_state = "hash blocks"
        await self._prefetch_runs(tree_filter=HASH)
        await self._prefetch_idle()
        self.prefetch_state = "reusing"
        batch = self.cfg.reuse_batch
        for ino in list(self.image.source_maps):
            node = self.image.ns.inodes.get(ino)
            if node is None or node.data is None or node.data.complete:
                continue
            absent = node.data.missing(0, node.data.count)
            for i in range(0, len(absent), batch):
                job = self._plan(ino, absent[i:i + batch], [], extend=0, prefetch=False)
                if job is None:
                    continue
                try:
                    await self._reuse(node, job, [w for w in job.wants if w.tree == DATA])
                finally:
                    self._release(job, list(job.keys))
