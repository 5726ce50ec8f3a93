"""The tree of inodes and names, with the rules of R2 (and their errnos).

The same checks guard live changes from a loader and the replay of an image's
log, so a hostile image cannot build what a loader could not: a directory
with two names, a cycle, a bad name.
"""

from __future__ import annotations

import errno
import heapq
import stat
from types import MappingProxyType
from typing import Iterator, Mapping

from . import ROOT_INO
from .blockmap import BlockMap
from .errors import os_error
from .format.records import (MAX_NAME, InodeEntry, InodeFlags, file_type, needs_inodes2,
                             xattr_problem)
from .integrity.merkle import TreeGeometry, block_count


# One shared, read-only empty mapping: most inodes have no attributes, and a
# dict each would cost 64 bytes per inode.
NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})
_HAS_TREE = int(InodeFlags.HAS_TREE)


class Inode:
    """One inode. `mode` is the whole st_mode (type, setuid/setgid/sticky and
    permission bits); `uid`, `gid`, `rdev` are 0 and `xattrs` is empty for
    images written before format 1.1. `xattrs` maps names to values (the
    image's own attributes only, read-only) and there is one timestamp,
    `mtime_ns` (pack stores no atime/ctime so images are reproducible)."""

    __slots__ = ("ino", "mode", "size", "mtime_ns", "file_id", "root_hash",
                 "flags", "metadata", "target", "nlink", "parent", "children",
                 "data", "hashes", "geometry", "signed", "uid", "gid", "rdev", "xattrs",
                 "__weakref__")  # an index-backed namespace keeps inodes in a weak cache

    def __init__(self, e: InodeEntry, maps: bool = True):
        """`maps`: give a file empty block maps (an index gives its own)."""
        self.ino = e.ino
        self.mode = e.mode
        self.uid = e.uid
        self.gid = e.gid
        self.rdev = e.rdev
        self.xattrs = MappingProxyType(dict(e.xattrs)) if e.xattrs else NO_XATTRS
        self.size = e.size
        self.mtime_ns = e.mtime_ns
        self.file_id = e.file_id
        self.root_hash = e.root_hash
        self.flags = e.flags
        self.metadata = e.metadata
        self.target = e.target
        self.nlink = 0
        self.parent = 0  # directories only: their one parent (0 = unnamed)
        self.signed = False
        self.children: dict[bytes, int] | None = None
        self.data: BlockMap | None = None
        self.hashes: BlockMap | None = None
        self.geometry: TreeGeometry | None = None
        fmt = self.mode & 0o170000
        if fmt == stat.S_IFDIR:
            self.children = {}
        elif fmt == stat.S_IFREG:
            if self.has_tree:
                self.geometry = TreeGeometry(self.size)
            if maps:
                self.data = BlockMap(block_count(self.size))
                if self.geometry is not None:
                    self.hashes = BlockMap(self.geometry.hash_blocks)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)

    @property
    def has_tree(self) -> bool:
        return bool(int(self.flags) & _HAS_TREE)  # int: no enum arithmetic

    @property
    def complete(self) -> bool:
        if self.data is None:
            return True
        return self.data.complete and (self.hashes is None or self.hashes.complete)

    def entry(self) -> InodeEntry:
        return InodeEntry(self.ino, self.mode, self.size, self.mtime_ns, self.file_id,
                          self.root_hash, self.flags, self.metadata, self.target,
                          self.uid, self.gid, self.rdev, tuple(sorted(self.xattrs.items())))


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise os_error(errno.EINVAL, f"bad name {name!r}")
    if len(name) > MAX_NAME:
        raise os_error(errno.ENAMETOOLONG, "name longer than 255 bytes")


ALLOWED_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                 stat.S_IFIFO, stat.S_IFSOCK)
MAX_ID = 0xFFFFFFFF  # uid and gid are u32 on disk (and in the kernel)
MAX_RDEV = (1 << 64) - 1
# Inode numbers from 2^62 up are the mount's own (fusefs.SPECIAL_BASE: the
# hidden .incfs files); an image's inode there would be served as one of them.
INO_LIMIT = 1 << 62


class Namespace:
    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1
        # Set once any inode needs format 1.1 (owners, devices, attributes):
        # the canonical root then covers those fields for every inode.
        self.posix = False

    def __len__(self) -> int:
        return len(self.inodes)

    def get(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is None:
            raise os_error(errno.ENOENT, f"no inode {ino}")
        return node

    def stat(self, ino: int) -> Inode | None:
        """What a stat answer needs of `ino` (the inode itself here), or None."""
        return self.inodes.get(ino)

    def may_have_xattrs(self, ino: int) -> bool:
        """False only when `ino` surely stores no extended attributes (then
        a getxattr needs no inode built); True when it may, or is unknown."""
        node = self.inodes.get(ino)
        return node is None or bool(node.xattrs)

    def listing(self, node: Inode) -> tuple[list[bytes], list[int], bytes, bytes | None]:
        """A directory's names, the inode each names, its file type (mode >>
        12, one byte each) in a stable order, and the names' lengths (one
        byte each) if at hand, else None."""
        items = list(node.children.items())
        children = [child for _, child in items]
        types = bytes(file_type(self.stat(child).mode) for child in children)
        return [name for name, _ in items], children, types, None

    def encoded_listing(self, node: Inode) -> tuple | None:
        """A directory's READDIR records made already (records, where each
        starts, inodes, types: incfs.fuse Listing.from_records), if this
        namespace has them cheaper than `listing`; else None."""
        return None

    def directory(self, ino: int) -> Inode:
        node = self.get(ino)
        if not node.is_dir:
            raise os_error(errno.ENOTDIR, f"inode {ino} is not a directory")
        return node

    def lookup(self, parent: int, name: bytes) -> Inode:
        child = self.directory(parent).children.get(name)
        if child is None:
            raise os_error(errno.ENOENT, f"no {name!r} in inode {parent}")
        return self.inodes[child]

    # --- checks (raise OSError) then applies (never fail) -------------------

    def check_add_inode(self, e: InodeEntry) -> None:
        if e.ino in self.inodes or e.ino < ROOT_INO:
            raise os_error(errno.EEXIST, f"inode {e.ino} exists")
        if e.ino >= INO_LIMIT:
            raise os_error(errno.ENOSPC, f"inode number {e.ino} is out of range")
        self.check_entry(e)

    @classmethod
    def check_entry(cls, e: InodeEntry) -> None:
        """The rules for one inode on its own (type, size, target, owners)."""
        if e.target and not stat.S_ISLNK(e.mode):
            raise os_error(errno.EINVAL, "only symlinks have a target")
        if stat.S_IFMT(e.mode) not in ALLOWED_TYPES:
            raise os_error(errno.EINVAL, f"unsupported file type {oct(e.mode)}")
        if not stat.S_ISREG(e.mode) and e.size and not stat.S_ISLNK(e.mode):
            raise os_error(errno.EINVAL, "only files have a size")
        if e.ino == ROOT_INO and not stat.S_ISDIR(e.mode):
            raise os_error(errno.EINVAL, "the root must be a directory")
        cls._check_posix(e)

    @staticmethod
    def _check_posix(e: InodeEntry) -> None:
        if not (0 <= e.uid <= MAX_ID and 0 <= e.gid <= MAX_ID):
            raise os_error(errno.EINVAL, f"inode {e.ino}: owner out of range")
        if e.rdev and not (stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode)):
            raise os_error(errno.EINVAL, "only devices have a device number")
        if not 0 <= e.rdev <= MAX_RDEV:
            raise os_error(errno.EINVAL, f"inode {e.ino}: device number out of range")
        why = xattr_problem(e.xattrs)
        if why:
            raise os_error(errno.EINVAL, f"inode {e.ino}: {why}")

    def add_inode(self, e: InodeEntry) -> Inode:
        node = Inode(e)
        self.inodes[e.ino] = node
        if not self.posix and needs_inodes2(e):
            self.posix = True
        self.next_ino = max(self.next_ino, e.ino + 1)
        return node

    def check_link(self, child: int, parent: int, name: bytes) -> None:
        check_name(name)
        pdir = self.directory(parent)
        node = self.get(child)
        if name in pdir.children:
            raise os_error(errno.EEXIST, f"{name!r} exists")
        if child == ROOT_INO or child == parent:
            raise os_error(errno.EINVAL, "a directory cannot go into itself, nor the root anywhere")
        if node.is_dir:
            if node.parent:
                raise os_error(errno.EMLINK, "a directory has exactly one name")
            if self._is_under(parent, child):
                raise os_error(errno.EMLINK, "that name would make a loop")

    def _is_under(self, ino: int, ancestor: int) -> bool:
        seen = 0
        while ino and seen <= len(self.inodes):
            if ino == ancestor:
                return True
            ino = self.inodes[ino].parent
            seen += 1
        return False

    def link(self, child: int, parent: int, name: bytes) -> None:
        self.inodes[parent].children[name] = child
        node = self.inodes[child]
        node.nlink += 1
        if node.is_dir:
            node.parent = parent
            self.inodes[parent].nlink += 1  # the child's ".."

    def check_unlink(self, parent: int, name: bytes) -> Inode:
        node = self.lookup(parent, name)
        if node.is_dir and node.children:
            raise os_error(errno.ENOTEMPTY, f"{name!r} is not empty")
        return node

    def unlink(self, parent: int, name: bytes) -> None:
        child = self.inodes[parent].children.pop(name)
        node = self.inodes[child]
        node.nlink -= 1
        if node.is_dir:
            node.parent = 0
            self.inodes[parent].nlink -= 1

    def files_after(self, after: int, count: int) -> list[int]:
        """The first `count` regular files with inode numbers above `after`."""
        return heapq.nsmallest(count, (ino for ino, n in list(self.inodes.items())
                                       if ino > after and n.data is not None))

    def pin(self, node: Inode) -> None:
        """Keep `node` as it is now (its maps or names are about to change);
        every inode of this namespace is kept anyway."""

    def mark_signed(self) -> None:
        for node in self.inodes.values():
            node.signed = True

    def totals(self) -> dict[str, int]:
        files = blocks_total = blocks_present = 0
        for node in self.inodes.values():
            if node.data is not None:
                files += 1
                blocks_total += node.data.count + (node.hashes.count if node.hashes else 0)
                blocks_present += node.data.present + (node.hashes.present if node.hashes else 0)
        return {"files": files, "inodes": len(self), "blocks_total": blocks_total,
                "blocks_present": blocks_present}

    # --- walking -------------------------------------------------------------

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
        """Yield (path, inode) for every name under `ino`, depth first, sorted."""
        stack = [(prefix, ino)]
        while stack:
            path, cur = stack.pop()
            node = self.inodes[cur]
            yield path, node
            if node.is_dir:
                for name in sorted(node.children, reverse=True):
                    stack.append((path + b"/" + name, node.children[name]))

    def path_of(self, ino: int) -> bytes:
        """A path for an inode (directories have one; files: the first found)."""
        for path, node in self.walk():
            if node.ino == ino:
                return path or b"/"
        raise os_error(errno.ENOENT, f"inode {ino} has no name")
