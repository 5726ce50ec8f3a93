"""Helpers of the disk-space tests (test_space*.py): a packed image, a cache
of it filled offline (no mount, no network), and plain copies made the way
passthrough makes them. (No tests here.)"""

from __future__ import annotations

import os
import random
from pathlib import Path

from incfs.format.layout import Superblock
from incfs.format.records import TreeKind, info_kind, info_size
from incfs.image import FillBlock, Image
from incfs.loader import write_cache
from incfs.pack import pack

MiB = 1 << 20


def packed(tmp: Path, *, big: int = 3 * MiB, compress: str = "none", sign_key=None) -> Path:
    rng = random.Random(13)
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "big").write_bytes(rng.randbytes(big))
    (src / "d" / "small").write_bytes(rng.randbytes(10_000))
    (src / "d" / "text").write_bytes(b"some text\n" * 30_000)
    (src / "zeros").write_bytes(bytes(300_000))
    image = tmp / "app.img"
    pack(src, image, compress=compress, sign_key=sign_key)
    return image


def contents(tmp: Path) -> dict[str, bytes]:
    src = tmp / "src"
    return {str(p.relative_to(src)): p.read_bytes() for p in src.rglob("*") if p.is_file()}


def filled_cache(image: Path, cache: Path, *, only: set[str] | None = None) -> Image:
    """A cache of `image` with every block (of the named files) stored, as a
    loader would store them (verified fills of the stored bytes)."""
    raw = image.read_bytes()
    sb = Superblock.decode(raw[:4096])
    img = write_cache(cache, sb, raw[:sb.meta_end])
    with Image.open(image) as src:
        for path, node in src.ns.walk():
            if node.data is None or (only is not None and path.decode().lstrip("/") not in only):
                continue
            blocks = []
            for tree, bmap in ((TreeKind.HASH, node.hashes), (TreeKind.DATA, node.data)):
                for i, offset, info, _crc in (bmap.entries() if bmap else ()):
                    data = src.stored_bytes(node, offset, info_size(info)) if info_size(info) else \
                        bytes(min(4096, node.size - i * 4096) if tree == TreeKind.DATA else 4096)
                    kind = info_kind(info) if info_size(info) else info_kind(0)
                    blocks.append(FillBlock(i, data, kind, tree))
            result = img.fill(node.ino, blocks)
            assert not result.errors, result.errors
    os.fsync(img.fd)
    return img


def node_of(img: Image, path: str):
    for p, node in img.ns.walk():
        if p.decode().lstrip("/") == path:
            return node
    raise KeyError(path)


def write_plain(img: Image, node) -> Path:
    """The plain copy passthrough would write: verified bytes, fsynced."""
    path = img.plain.path(node)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(img.read_range(node, 0, node.size))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.chmod(path, 0o400)
    return path


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
