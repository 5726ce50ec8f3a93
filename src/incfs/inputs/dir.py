"""A directory tree as pack input: everything `lstat` and the extended
attribute calls say, symlinks not followed."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from ..errors import UsageError
from ..format.records import RESERVED_XATTR_PREFIX
from .base import Entry, normalize

# Errors that mean "this file system keeps no extended attributes".
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class DirInput:
    def __init__(self, root: Path, exclude: set[tuple[int, int]] | None = None):
        self.root = root
        self.exclude = exclude if exclude is not None else set()  # (dev, ino) never to pack
        self.notes: list[str] = []

    def close(self) -> None:
        pass

    def entries(self) -> Iterator[Entry]:
        """Depth first with names in byte order, which is also the order the
        image numbers inodes in, so data lands in inode order."""
        seen: dict[tuple[int, int], bytes] = {}
        # SRC itself may be a symlink to the tree: its target is the root
        yield self._entry(b"", self.root, os.stat(self.root), seen)
        stack = [(b"", self.root)]
        while stack:
            rel, directory = stack.pop()
            subdirs = []
            for name, path, st in self._list(directory):
                child = rel + b"/" + name if rel else name
                yield self._entry(child, path, st, seen)
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((child, path))
            stack.extend(reversed(subdirs))

    def _list(self, directory: Path) -> list[tuple[bytes, Path, os.stat_result]]:
        try:
            found = sorted(os.scandir(directory), key=lambda e: os.fsencode(e.name))
            out = []
            for entry in found:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in self.exclude:
                    out.append((os.fsencode(entry.name), Path(entry.path), st))
            return out
        except OSError as e:
            raise UsageError(f"cannot read directory {directory}: {e.strerror}") from None

    def _entry(self, rel: bytes, path: Path, st: os.stat_result,
               seen: dict[tuple[int, int], bytes]) -> Entry:
        if rel:
            normalize(rel, str(path))  # names the file if a name is unusable
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            if key in seen:
                return Entry(rel, st.st_mode, link=seen[key], origin=str(path))
            seen[key] = rel
        entry = Entry(rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                      xattrs=_xattrs(path), origin=str(path))
        if stat.S_ISREG(st.st_mode):
            entry.size = st.st_size
            entry.data = lambda: open(path, "rb")
        elif stat.S_ISLNK(st.st_mode):
            entry.target = _readlink(path)
            entry.size = len(entry.target)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry.rdev = st.st_rdev
        return entry


def _readlink(path: Path) -> bytes:
    try:
        return os.readlink(os.fsencode(path))
    except OSError as e:
        raise UsageError(f"cannot read symlink {path}: {e.strerror}") from None


def _xattrs(path: Path) -> dict[bytes, bytes] | None:
    """The entry's extended attributes (all namespaces the caller may read;
    root sees trusted.* too), without incfs's own user.incfs.*."""
    raw = os.fsencode(path)
    try:
        names = os.listxattr(raw, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return None
        raise UsageError(f"cannot list extended attributes of {path}: {e.strerror}") from None
    out = {}
    for name in names:
        bname = os.fsencode(name)
        if bname.startswith(RESERVED_XATTR_PREFIX):
            continue
        try:
            out[bname] = os.getxattr(raw, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed since the listing
                continue
            raise UsageError(f"cannot read extended attribute {name} of {path}: "
                             f"{e.strerror}") from None
    return out or None
