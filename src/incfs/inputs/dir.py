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
from ..namespace import check_name
from .base import Entry, bad_name

# Errors that mean "this file system keeps no extended attributes".
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


class DirInput:
    """Paths are handled as bytes (no pathlib objects per file: a million
    files made that a tenth of pack's time)."""

    def __init__(self, root: Path, exclude: set[tuple[int, int]] | None = None):
        self.root = root
        self.top = os.fsencode(root)
        self.exclude = exclude if exclude is not None else set()  # (dev, ino) never to pack
        self.notes: list[str] = []
        self.seen: dict[tuple[int, int], bytes] = {}  # (dev, ino) -> first path, nlink > 1

    def close(self) -> None:
        pass

    def root_entry(self) -> Entry:
        """The root, and a fresh start for hard links."""
        self.seen = {}
        # SRC itself may be a symlink to the tree: its target is the root
        return self._entry(b"", self.top, os.stat(self.top))

    def listing(self, rel: bytes) -> list[Entry]:
        """The entries of directory `rel` (b"" is the root), names in byte order."""
        directory = os.path.join(self.top, rel) if rel else self.top
        return [self._entry(rel + b"/" + name if rel else name, path, st)
                for name, path, st in self._list(directory)]

    def entries(self) -> Iterator[Entry]:
        """Depth first by directory: each directory's entries, names in byte
        order, then its subdirectories'. (Pack walks `listing` itself, in
        inode order, and reads files in this same order.)"""
        yield self.root_entry()
        stack = [b""]
        while stack:
            children = self.listing(stack.pop())
            yield from children
            stack.extend(reversed([e.path for e in children if e.is_dir]))

    def _list(self, directory: bytes) -> list[tuple[bytes, bytes, os.stat_result]]:
        try:
            with os.scandir(directory) as it:
                found = sorted(it, key=lambda e: e.name)
            out = []
            for entry in found:
                st = entry.stat(follow_symlinks=False)
                if (st.st_dev, st.st_ino) not in self.exclude:
                    out.append((entry.name, entry.path, st))
            return out
        except OSError as e:
            raise UsageError(f"cannot read directory {os.fsdecode(directory)}: "
                             f"{e.strerror}") from None

    def _entry(self, rel: bytes, path: bytes, st: os.stat_result) -> Entry:
        origin = os.fsdecode(path)
        if rel:
            # the directories above were checked as entries: only the last name is new
            try:
                check_name(rel.rpartition(b"/")[2])
            except OSError as e:
                raise bad_name(rel, origin, e) from None
        key = (st.st_dev, st.st_ino)
        shared = not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
        if shared:
            if key in self.seen:
                return Entry(rel, st.st_mode, link=self.seen[key], origin=origin)
            self.seen[key] = rel
        entry = Entry(rel, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                      xattrs=_xattrs(path, origin), origin=origin, shared=shared)
        if stat.S_ISREG(st.st_mode):
            entry.size = st.st_size
            # unbuffered: pack reads whole blocks, and an empty file's open is most of its cost
            entry.data = lambda: open(origin, "rb", buffering=0)
        elif stat.S_ISLNK(st.st_mode):
            entry.target = _readlink(path, origin)
            entry.size = len(entry.target)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry.rdev = st.st_rdev
        return entry


def _readlink(path: bytes, origin: str) -> bytes:
    try:
        return os.readlink(path)
    except OSError as e:
        raise UsageError(f"cannot read symlink {origin}: {e.strerror}") from None


def _xattrs(raw: bytes, path: str) -> dict[bytes, bytes] | None:
    """The entry's extended attributes (all namespaces the caller may read;
    root sees trusted.* too), without incfs's own user.incfs.*; `path` is
    for messages."""
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
