"""A cache of a packed image filled offline, as the loader would fill it
(verified fills of the stored bytes), for tests and the crash harness."""

from __future__ import annotations

import os
from pathlib import Path

from ..format.layout import Superblock
from ..format.records import BlockKind, TreeKind, info_kind, info_size
from ..image import FillBlock, Image
from ..loader import write_cache


def new_cache(image: Path, cache: Path) -> Image:
    """An empty cache of `image` (its metadata only), open for writing."""
    with open(image, "rb") as f:
        sb = Superblock.decode(f.read(4096))
        f.seek(0)
        meta = f.read(sb.meta_end)
    return write_cache(cache, sb, meta)


def fill_from(src: Image, dst: Image, path: bytes | None = None, *,
              trees: bool = True) -> int:
    """Store every block of the source's files (or of the one at `path`)
    that `dst` lacks; returns how many were stored."""
    stored = 0
    for p, node in src.ns.walk():
        if node.data is None or (path is not None and p != path):
            continue
        want = dst.ns.inodes[node.ino]
        blocks = []
        spaces = ((TreeKind.HASH, node.hashes, want.hashes),) if trees else ()
        for tree, bmap, have in spaces + ((TreeKind.DATA, node.data, want.data),):
            for i, offset, info, _crc in (bmap.entries() if bmap else ()):
                if not have.is_present(i):
                    blocks.append(stored_block(src, node, tree, i, offset, info))
        if blocks:
            result = dst.fill(node.ino, blocks)
            if result.errors:
                raise AssertionError(f"fill of {p!r} refused: {result.errors[:3]}")
            stored += result.stored
    return stored


def stored_block(src: Image, node, tree: TreeKind, i: int, offset: int, info: int) -> FillBlock:
    if info_kind(info) is BlockKind.ZERO:
        size = min(4096, node.size - i * 4096) if tree == TreeKind.DATA else 4096
        return FillBlock(i, bytes(size), BlockKind.RAW, tree)
    return FillBlock(i, src.stored_bytes(node, offset, info_size(info)), info_kind(info), tree)


def filled_cache(image: Path, cache: Path) -> Image:
    img = new_cache(image, cache)
    with Image.open(image) as src:
        fill_from(src, img)
    os.fsync(img.fd)
    return img
