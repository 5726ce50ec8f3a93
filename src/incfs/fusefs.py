"""pyfuse3 operations: a thin translation of FUSE calls to the Service.

It never fetches: a read of an absent block waits in `Service.read` while a
loader fills it. Everything that would change the tree fails with EROFS.
Content never changes once present, so replies carry long cache timeouts and
files open with keep_cache; names that a loader removes are invalidated.

A hidden directory `.incfs` in the root (looked up by name, never listed, so
`find`, `tar` and `diff -r` see only the image) holds `status` (JSON),
`pending` (pending reads, one per line) and `control` (the socket path).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from typing import Callable

import pyfuse3

from . import BLOCK_SIZE, ROOT_INO
from .errors import IntegrityError
from .namespace import Inode
from .service import ReaderGone, ReadTimedOut, Service

log = logging.getLogger("incfs.fuse")

CACHE_TIMEOUT = 3600.0
SPECIAL_BASE = 1 << 62
CONTROL_DIR = b".incfs"
SPECIAL_DIR_INO = SPECIAL_BASE
SPECIAL_FILES = {b"status": SPECIAL_BASE + 1, b"pending": SPECIAL_BASE + 2,
                 b"control": SPECIAL_BASE + 3}
XATTRS = (b"user.incfs.file_id", b"user.incfs.metadata", b"user.incfs.verity_digest",
          b"user.incfs.blocks")


def _erofs(*_args, **_kwargs):
    raise pyfuse3.FUSEError(errno.EROFS)


class IncfsOperations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, service: Service, control_path: str):
        super().__init__()
        self.service = service
        self.ns = service.image.ns
        self.control_path = control_path
        self.uid, self.gid = os.getuid(), os.getgid()
        self._handles: dict[int, tuple[Inode | bytes, int]] = {}
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._next_fh = 1

    # --- attributes ----------------------------------------------------------

    def _node(self, ino: int) -> Inode:
        node = self.ns.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_size = len(node.target) if node.target else node.size
        if node.is_dir:
            a.st_nlink = node.nlink + (1 if node.parent else 2)
        else:
            a.st_nlink = max(node.nlink, 1)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        a.entry_timeout = a.attr_timeout = CACHE_TIMEOUT
        return a

    def _special_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = (stat.S_IFDIR | 0o555) if ino == SPECIAL_DIR_INO else (stat.S_IFREG | 0o444)
        a.st_nlink = 2 if ino == SPECIAL_DIR_INO else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = 0
        a.st_blksize = BLOCK_SIZE
        a.entry_timeout = a.attr_timeout = 0
        return a

    async def getattr(self, inode, ctx=None):
        if inode >= SPECIAL_BASE:
            return self._special_attr(inode)
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT_INO and name == CONTROL_DIR:
            return self._special_attr(SPECIAL_DIR_INO)
        if parent_inode == SPECIAL_DIR_INO:
            if name in SPECIAL_FILES:
                return self._special_attr(SPECIAL_FILES[name])
            raise pyfuse3.FUSEError(errno.ENOENT)
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent or ROOT_INO))
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.ns.inodes[child])

    async def forget(self, inode_list):
        pass

    async def readlink(self, inode, ctx):
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)

    # --- directories -----------------------------------------------------------

    async def opendir(self, inode, ctx):
        if inode == SPECIAL_DIR_INO:
            listing = sorted((name, ino) for name, ino in SPECIAL_FILES.items())
        else:
            node = self._node(inode)
            if not node.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = list(node.children.items())
        fh = self._new_fh()
        self._dirs[fh] = listing
        return fh

    async def readdir(self, fh, start_id, token):
        listing = self._dirs.get(fh, [])
        for i in range(start_id, len(listing)):
            name, ino = listing[i]
            if ino >= SPECIAL_BASE:
                attr = self._special_attr(ino)
            else:
                node = self.ns.inodes.get(ino)
                if node is None:
                    continue
                attr = self._attr(node)
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # --- files -------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._new_fh()
        if inode >= SPECIAL_BASE:
            self._handles[fh] = (self._special_content(inode), ctx.pid)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._handles[fh] = (node, ctx.pid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        target, pid = handle
        if isinstance(target, bytes):
            return target[off:off + size]
        try:
            return await self.service.read(target, off, size, pid)
        except ReadTimedOut:
            raise pyfuse3.FUSEError(errno.ETIME) from None
        except ReaderGone:
            raise pyfuse3.FUSEError(errno.EINTR) from None
        except IntegrityError as e:
            self.service.counters["read_errors"] += 1
            log.warning("refusing to serve: %s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        self._handles.pop(fh, None)

    def _special_content(self, ino: int) -> bytes:
        if ino == SPECIAL_FILES[b"status"]:
            return (json.dumps(self.service.status(), indent=2, sort_keys=True) + "\n").encode()
        if ino == SPECIAL_FILES[b"pending"]:
            lines = [f"{pr.serial} {pr.ino} {'hash' if pr.tree else 'data'} {pr.index} {pr.time_ns}"
                     for pr in self.service.waits.newer_than(0, limit=1 << 30)]
            return ("".join(line + "\n" for line in lines)).encode()
        if ino == SPECIAL_FILES[b"control"]:
            return (self.control_path + "\n").encode()
        raise pyfuse3.FUSEError(errno.EISDIR)

    # --- extended attributes -------------------------------------------------------

    async def listxattr(self, inode, ctx):
        if inode >= SPECIAL_BASE:
            return []
        return list(XATTRS) if self._node(inode).is_reg else [XATTRS[0], XATTRS[1]]

    async def getxattr(self, inode, name, ctx):
        if inode >= SPECIAL_BASE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        values: dict[bytes, Callable[[], bytes]] = {
            XATTRS[0]: lambda: node.file_id.hex().encode(),
            XATTRS[1]: lambda: node.metadata,
        }
        if node.is_reg:
            values[XATTRS[2]] = lambda: (
                b"sha256:" + self.service.image.file_digest(node).hex().encode()
                if node.has_tree else b"")
            values[XATTRS[3]] = lambda: f"{node.data.present}/{node.data.count}".encode()
        if name not in values:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return values[name]()

    # --- the file system ---------------------------------------------------------

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        totals = self.service.image.totals()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = totals["blocks_total"]
        s.f_bfree = s.f_bavail = 0
        s.f_files = totals["inodes"]
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # Read-only to programs: every change fails with EROFS.
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _erofs
    create = write = setxattr = removexattr = fallocate = _erofs


def invalidator(wait: bool = False) -> Callable[[int, bytes], None]:
    """Tell the kernel a name changed (it may have cached it for an hour).

    With `wait` the kernel has forgotten the name when this returns (it
    blocks: call it from a worker thread, never the trio thread), so a
    loader's unlink is visible to programs once it is acknowledged."""
    def invalidate(parent: int, name: bytes) -> None:
        try:
            if wait:
                pyfuse3.invalidate_entry(parent, name)
            else:
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        except Exception as e:  # the kernel may not know the entry: fine
            log.debug("invalidate %s/%r: %s", parent, name, e)
    return invalidate
