"""Helpers of the disk-space tests (test_space*.py): a packed image, a cache
of it filled offline (no mount, no network), and plain copies made the way
passthrough makes them. (No tests here.)"""

from __future__ import annotations

import os
import random
from pathlib import Path

from incfs.image import Image
from incfs.pack import pack
from incfs.testing import caches

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


def filled_cache(image: Path, cache: Path) -> Image:
    return caches.filled_cache(image, cache)


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
