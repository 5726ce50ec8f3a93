"""Compaction: rewrite an image as a fresh packed image, folding every record
layered over its index (or a whole 1.0/1.1 log) into a new index.

The tree as served (names, modes, owners, times, attributes, user metadata,
file ids, data) goes through `pack` again, so the result is an ordinary
packed image: inode numbers are renumbered in pack's order, the payload is
laid out anew and the signature, if wanted, is made over the new index. Only
complete images can be compacted (a block that is absent has no bytes to
copy); a cache is filled by its loader first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .errors import UsageError
from .format.layout import SuperFlags
from .image import Image
from .inputs.base import Entry
from .namespace import Inode
from .pack import PackStats, pack


class _NodeReader:
    """A file object over one file of an image (verified reads)."""

    def __init__(self, img: Image, node: Inode):
        self.img, self.node, self.pos = img, node, 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.node.size - self.pos
        data = self.img.read_range(self.node, self.pos, n)
        self.pos += len(data)
        return data

    def __enter__(self) -> "_NodeReader":
        return self

    def __exit__(self, *exc) -> None:
        pass


class ImageInput:
    """A pack input that yields an open image's tree as it is served."""

    def __init__(self, img: Image):
        self.img = img
        self.notes: list[str] = []

    def close(self) -> None:
        pass

    def entries(self) -> Iterator[Entry]:
        first: dict[int, bytes] = {}  # only inodes with several names
        for path, node in self.img.ns.walk():
            rel = path[1:]  # walk paths start with "/" (the root is b"")
            if not node.is_dir and node.nlink > 1:
                if node.ino in first:
                    yield Entry(rel, node.mode, link=first[node.ino], origin=self._origin(rel))
                    continue
                first[node.ino] = rel
            yield self._entry(rel, node)

    def _entry(self, rel: bytes, node: Inode) -> Entry:
        e = Entry(rel, node.mode, node.uid, node.gid, node.mtime_ns, rdev=node.rdev,
                  target=node.target, xattrs=dict(node.xattrs) or None,
                  origin=self._origin(rel), metadata=node.metadata, file_id=node.file_id)
        if node.is_reg:
            e.size = node.size
            e.data = lambda: _NodeReader(self.img, node)
        elif node.is_symlink:
            e.size = len(node.target)
        return e

    def _origin(self, rel: bytes) -> str:
        return f"{self.img.path}:/{os.fsdecode(rel)}"


def compact(path: str | os.PathLike, target: str | os.PathLike | None = None, *,
            compress: str = "zstd", sign_key: str | os.PathLike | None = None) -> PackStats:
    """Rewrite the image at `path` with a fresh index, in place (the old file
    is replaced only once the new one is complete) or into `target`. The
    image is held with its writer lock meanwhile, so no mount or loader
    changes it under the rewrite."""
    path = Path(path)
    with Image.open(path, writable=True) as img:
        if img.superblock.flags & SuperFlags.CACHE:
            raise UsageError(f"{path} is a cache image; its loader owns it")
        totals = img.totals()
        if totals["blocks_present"] != totals["blocks_total"]:
            missing = totals["blocks_total"] - totals["blocks_present"]
            raise UsageError(f"{path} is not complete ({missing} blocks absent); "
                             "only complete images can be compacted")
        out = Path(target) if target is not None else path
        return pack(ImageInput(img), out, compress=compress, sign_key=sign_key,
                    overwrite=True)
