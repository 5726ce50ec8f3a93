"""The incfs file system on our FUSE session layer (incfs.fuse): a thin
translation of FUSE requests to the Service.

It never fetches: a read of an absent block waits in `Service.read` while a
loader fills it. Everything that would change the tree fails with EROFS (in
the session). Content never changes once present, so replies carry long
cache timeouts, files open with FOPEN_KEEP_CACHE, directories with
FOPEN_CACHE_DIR (the kernel keeps listings), and names or listings a loader
changes are invalidated. Complete, verified files open in passthrough mode
when the kernel and our privileges allow it (see passthrough.py).

A hidden directory `.incfs` in the root (looked up by name, never listed, so
`find`, `tar` and `diff -r` see only the image) holds `status` (JSON),
`pending` (pending reads, one per line) and `control` (the socket path), and
incfs v2's two directories: `index/<file-id>` is the file with that id (the
same inode as its path; not listed), `incomplete/<file-id>` lists the files
not complete yet, each a symlink to `../index/<file-id>` that goes when its
last block arrives (the kernel is told, see `file_completed`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections import OrderedDict
from typing import Callable

from . import BLOCK_SIZE, ROOT_INO
from .errors import IntegrityError
from .fileids import FileIds
from .format.index import damage
from .format.records import file_type
from .fuse import Attr, Connection, Context, Entry, FuseError, Listing, OpenFlag, Opened
from .fuse import Operations, StatFs
from .fuse.ops import pack_entry
from .listings import Listings
from .namespace import Inode
from .service import ReaderGone, ReadTimedOut, Service, TailAbsent

log = logging.getLogger("incfs.fuse")

SPARED_LIMIT = 4096  # remembered readahead windows answered early (per mount)
CACHE_TIMEOUT = 3600.0  # names and attributes change only through a loader, which invalidates
SPECIAL_BASE = 1 << 62
CONTROL_DIR = b".incfs"
SPECIAL_DIR_INO = SPECIAL_BASE
SPECIAL_FILES = {b"status": SPECIAL_BASE + 1, b"pending": SPECIAL_BASE + 2,
                 b"control": SPECIAL_BASE + 3}
INDEX_DIR_INO = SPECIAL_BASE + 4
INCOMPLETE_DIR_INO = SPECIAL_BASE + 5
SPECIAL_NAMES = {**SPECIAL_FILES, b"index": INDEX_DIR_INO, b"incomplete": INCOMPLETE_DIR_INO}
SPECIAL_DIRS = frozenset({SPECIAL_DIR_INO, INDEX_DIR_INO, INCOMPLETE_DIR_INO})
# `.incfs/incomplete/<id>` of inode N is node (1 << 63) | N, a symlink of its
# own: not the file's inode, because telling the kernel an entry is deleted
# (FUSE_NOTIFY_DELETE) zeroes the link count of the inode it names
PLACEHOLDER_BASE = 1 << 63
# incfs's own attributes, by name (never listed); .io says "passthrough" or
# "daemon": who serves the file's reads
INCFS_XATTRS = (b"user.incfs.file_id", b"user.incfs.metadata", b"user.incfs.verity_digest",
                b"user.incfs.blocks", b"user.incfs.io")


TRUSTED_PREFIX = b"trusted."
CAP_SYS_ADMIN = 21


def caller_is_admin(ctx: Context) -> bool:
    """Whether the caller has CAP_SYS_ADMIN (its effective set, from /proc);
    uid 0 when its status cannot be read (it exited, another pid namespace)."""
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return ctx.uid == 0


def _special_type(ino: int) -> int:
    """The d_type of an entry of `.incfs` or its directories."""
    if ino >= PLACEHOLDER_BASE:
        return stat.S_IFLNK >> 12
    return (stat.S_IFDIR if ino in SPECIAL_DIRS else stat.S_IFREG) >> 12


class IncfsOperations(Operations):
    def __init__(self, service: Service, control_path: str, stored_owners: bool | None = None):
        self.service = service
        # owners as stored in the image (root's mounts), or every file the
        # mounting user's (a normal user's mount: stored ids mean nothing there)
        self.stored_owners = os.geteuid() == 0 if stored_owners is None else stored_owners
        self.ns = service.image.ns
        self.ids = FileIds(self.ns)
        # whether the kernel has heard of .incfs/incomplete: until then no
        # change there needs telling it (and no create pays a thread hop).
        # A daemon taking over a connection cannot know what an earlier one
        # showed the kernel, so it assumes everything.
        self._incomplete_known = service.restarts > 0
        self.control_path = control_path
        self.uid, self.gid = os.getuid(), os.getgid()
        self._files: dict[int, tuple[Inode | bytes, int]] = {}  # fh -> (node or content, pid)
        self.listings = Listings(self._make_listing, self._parent_of)
        # handles of successive daemons on one connection never collide
        self._next_fh = (service.restarts << 40) + 1
        self._spared: OrderedDict[tuple[int, int], None] = OrderedDict()  # (ino, offset) answered TailAbsent
        self.conn: Connection | None = None
        self.passthrough = None  # a passthrough.Passthrough once INIT allows it

    def init(self, conn: Connection) -> None:
        self.conn = conn

    # --- attributes ----------------------------------------------------------

    def _node(self, ino: int) -> Inode:
        node = self.ns.inodes.get(ino)
        if node is None:
            raise FuseError(errno.ENOENT)
        return node

    def _stat(self, ino: int):
        """The inode, or just what stat needs of it (no inode built)."""
        node = self.ns.stat(ino)
        if node is None:
            raise FuseError(errno.ENOENT)
        return node

    def _attr(self, node: Inode) -> Attr:
        nlink, size, uid, gid = self._stat_values(node)
        return Attr(ino=node.ino, mode=node.mode, size=size, nlink=nlink, uid=uid, gid=gid,
                    rdev=node.rdev, blksize=BLOCK_SIZE, atime_ns=node.mtime_ns,
                    mtime_ns=node.mtime_ns, ctime_ns=node.mtime_ns)

    def _stat_values(self, node: Inode) -> tuple[int, int, int, int]:
        """nlink, size, uid and gid as stat shows them."""
        if node.is_dir:
            nlink = node.nlink + (1 if node.parent else 2)
        else:
            nlink = max(node.nlink, 1)
        size = len(node.target) if node.target else node.size
        uid, gid = (node.uid, node.gid) if self.stored_owners else (self.uid, self.gid)
        return nlink, size, uid, gid

    def _entry(self, node: Inode) -> Entry:
        return Entry(self._attr(node), CACHE_TIMEOUT, CACHE_TIMEOUT)

    def _packed_entry(self, node: Inode) -> bytes:
        """_entry(node).pack(), with no Attr or Entry made (READDIRPLUS)."""
        nlink, size, uid, gid = self._stat_values(node)
        return pack_entry(node.ino, node.mode, size, nlink, uid, gid, node.rdev, node.mtime_ns,
                          CACHE_TIMEOUT, BLOCK_SIZE)

    def _special_entry(self, ino: int) -> Entry:
        if ino >= PLACEHOLDER_BASE:
            attr = Attr(ino=ino, mode=stat.S_IFLNK | 0o777, size=len(self._placeholder_target(ino)),
                        nlink=1, uid=self.uid, gid=self.gid)
        else:
            self._incomplete_known |= ino == INCOMPLETE_DIR_INO
            is_dir = ino in SPECIAL_DIRS
            attr = Attr(ino=ino, mode=(stat.S_IFDIR | 0o555) if is_dir else (stat.S_IFREG | 0o444),
                        nlink=2 if is_dir else 1, uid=self.uid, gid=self.gid)
        return Entry(attr, 0.0, 0.0)  # never cached: their content changes all the time

    def _placeholder_target(self, ino: int) -> bytes:
        node = self.ns.inodes.get(ino & ~PLACEHOLDER_BASE)
        if node is None or not node.is_reg:
            raise FuseError(errno.ENOENT)
        return b"../index/" + node.file_id.hex().encode()

    def getattr(self, ino: int, ctx: Context) -> tuple[Attr, float]:
        if ino >= SPECIAL_BASE:
            return self._special_entry(ino).attr, 0.0
        return self._attr(self._stat(ino)), CACHE_TIMEOUT

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        if parent == ROOT_INO and name == CONTROL_DIR:
            return self._special_entry(SPECIAL_DIR_INO)
        if parent >= SPECIAL_BASE:
            return self._special_lookup(parent, name)
        node = self._node(parent)
        if not node.is_dir:
            raise FuseError(errno.ENOTDIR)
        if name == b".":
            return self._entry(node)
        if name == b"..":
            return self._entry(self._node(node.parent or ROOT_INO))
        child = node.children.get(name)
        if child is None:
            # a negative entry the kernel keeps (node id 0): PATH and import
            # searches stat many names that are not there; a loader adding
            # the name invalidates it like any other
            return Entry(Attr(ino=0, mode=0), CACHE_TIMEOUT, 0.0)
        return self._entry(self._stat(child))

    def _special_lookup(self, parent: int, name: bytes) -> Entry:
        """Names in `.incfs` and its directories. Errors are not cached by
        the kernel, so a file created later is found at once."""
        if parent == SPECIAL_DIR_INO and name in SPECIAL_NAMES:
            return self._special_entry(SPECIAL_NAMES[name])
        node = self.ids.find(name) if parent in (INDEX_DIR_INO, INCOMPLETE_DIR_INO) else None
        if node is None:
            raise FuseError(errno.ENOENT)
        if parent == INDEX_DIR_INO:
            return self._entry(node)  # the file's own inode: reads and waits as by its path
        if node.complete:
            raise FuseError(errno.ENOENT)
        return self._special_entry(PLACEHOLDER_BASE | node.ino)

    def readlink(self, ino: int, ctx: Context) -> bytes:
        if ino >= PLACEHOLDER_BASE:
            return self._placeholder_target(ino)
        node = self._node(ino)
        if not stat.S_ISLNK(node.mode):
            raise FuseError(errno.EINVAL)
        return node.target

    def access(self, ino: int, mask: int, ctx: Context) -> None:
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)

    # --- directories -----------------------------------------------------------

    def opendir(self, ino: int, flags: int, ctx: Context) -> Opened:
        """ENOSYS: the kernel then opens directories without asking us
        (FUSE_NO_OPENDIR_SUPPORT) and keeps their listings cached
        (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE is its default for such opens),
        so a second `ls -R` sends nothing at all. readdir works by inode."""
        raise FuseError(errno.ENOSYS)

    def _make_listing(self, ino: int) -> Listing:
        """A directory's entries in a stable order (offsets are positions)."""
        if ino in SPECIAL_DIRS:
            return self._special_listing(ino)
        if ino >= SPECIAL_BASE:
            raise FuseError(errno.ENOTDIR)
        node = self._node(ino)
        if not node.is_dir:
            raise FuseError(errno.ENOTDIR)
        encoded = self.ns.encoded_listing(node)
        if encoded is not None:
            return Listing.from_records(*encoded)
        return Listing(*self.ns.listing(node))

    def _parent_of(self, ino: int) -> int:
        node = self.ns.stat(ino) if ino < SPECIAL_BASE else None
        return node.parent if node is not None else 0

    def _special_listing(self, ino: int) -> Listing:
        """`.incfs` lists its names; `index` lists nothing (every file is
        there by id, like Android's); `incomplete` the files not complete."""
        if ino == SPECIAL_DIR_INO:
            items = sorted(SPECIAL_NAMES.items())
        elif ino == INDEX_DIR_INO:
            items = []
        else:
            items = self._incomplete_items()
        types = bytes(_special_type(child) for _, child in items)
        return Listing([name for name, _ in items], [child for _, child in items], types)

    def _incomplete_items(self) -> list[tuple[bytes, int]]:
        items = []
        for child in sorted(self.ns.inodes):
            node = self.ns.inodes[child]
            if node.is_reg and not node.complete:
                name = node.file_id.hex().encode()
                if self.ids.find(name) is node:  # two files with one id: the one a lookup finds
                    items.append((name, PLACEHOLDER_BASE | child))
        return items

    def names_changed(self, parent: int) -> None:
        self.listings.drop(parent)

    def created(self, node: Inode) -> Callable[[], None] | None:
        """A loader created `node`; returns what to tell the kernel, if
        anything (run it in a worker thread: notifications may block)."""
        self.ids.add(node)
        if not node.is_reg or node.complete:
            return None
        self.names_changed(INCOMPLETE_DIR_INO)
        if not self._incomplete_known:
            return None
        session = self.service.fuse
        return lambda: session.invalidate_inode_now(INCOMPLETE_DIR_INO, 0, 0)

    def file_completed(self, node: Inode) -> Callable[[], None] | None:
        """`node` just got its last block: its `.incfs/incomplete` entry goes.
        Returns the kernel's part (for a worker thread): FUSE_NOTIFY_DELETE
        drops the cached name and its placeholder inode, so a watcher of
        the placeholder gets IN_DELETE_SELF; the directory's cached listing
        is invalidated with it. FUSE gives no IN_DELETE on the directory
        (the kernel sends that only for its own unlinks)."""
        self.names_changed(INCOMPLETE_DIR_INO)
        if not self._incomplete_known:
            return None
        session = self.service.fuse
        name = node.file_id.hex().encode()

        def tell_kernel() -> None:
            session.delete_entry_now(INCOMPLETE_DIR_INO, PLACEHOLDER_BASE | node.ino, name)
            session.invalidate_inode_now(INCOMPLETE_DIR_INO, 0, 0)
        return tell_kernel

    def listing(self, ino: int, fh: int, offset: int, ctx: Context) -> Listing:
        if ino == INCOMPLETE_DIR_INO and offset == 0:
            self.names_changed(ino)  # a new pass sees the files as they are now
        return self.listings.get(ino, offset)

    def idle(self) -> bool:
        # not from .incfs: listing `incomplete` looks at every inode
        return self.listings.last < SPECIAL_BASE and self.listings.ahead()

    def listed_entry(self, ino: int, d_type: int, ctx: Context) -> bytes | None:
        if ino >= SPECIAL_BASE:
            try:
                return self._special_entry(ino).pack()
            except FuseError:
                return None  # a placeholder whose file went
        node = self.ns.stat(ino)
        if node is None:
            return None
        if file_type(node.mode) != d_type:
            # a name block's stored type (docs/format.md, DTYPES) is not its
            # inode's: the whole reply fails, as a damaged block would
            raise damage(f"inode {ino} is listed with type {d_type}, its record says "
                         f"{file_type(node.mode)}")
        return self._packed_entry(node)

    # --- files -------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open(self, ino: int, flags: int, ctx: Context) -> Opened:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseError(errno.EROFS)
        fh = self._new_fh()
        if ino >= SPECIAL_BASE:
            self._files[fh] = (self._special_content(ino), ctx.pid)
            return Opened(fh, OpenFlag.DIRECT_IO)
        node = self._node(ino)
        if node.is_dir:
            raise FuseError(errno.EISDIR)
        self._files[fh] = (node, ctx.pid)
        # NOFLUSH: nothing is ever written, so close() need not wait for us
        if self.passthrough is not None:
            backing = self.passthrough.open(node)
            if backing is not None:
                self.service.waits.passed_through(node.ino)  # (its reads bypass us)
                return Opened(fh, OpenFlag.PASSTHROUGH | OpenFlag.NOFLUSH, backing)
        return Opened(fh, OpenFlag.KEEP_CACHE | OpenFlag.NOFLUSH)

    async def read(self, ino: int, fh: int, offset: int, size: int, ctx: Context) -> bytes:
        handle = self._files.get(fh)
        if handle is None or (isinstance(handle[0], Inode) and handle[0].ino != ino):
            handle = self._adopt(ino, fh)
        target, pid = handle
        if isinstance(target, bytes):
            return target[offset:offset + size]
        retry = (ino, offset) in self._spared
        try:
            # the reader is the READ's own thread (its process ends the
            # wait: reader_watch.py); the opener's pid only when the kernel
            # names none (a reader outside our pid namespace)
            return await self.service.read(target, offset, size, ctx.pid or pid,
                                           spare_tail=not retry, uid=ctx.uid)
        except TailAbsent:
            # An error on a page-cache read makes the kernel read just the
            # page it needs (read_folio); a short answer instead would make
            # it shrink the file (fuse_short_read). If the same offset comes
            # back (a large folio), it is needed whole: then it waits.
            self._remember_spared((ino, offset))
            raise FuseError(errno.EIO) from None
        except ReadTimedOut as e:
            block = e.key[2] if e.key and not e.key[1] else offset // BLOCK_SIZE
            bound = self.service.waits.timeout_for(ctx.uid)
            self.service.note_read_error(target, block, errno.ETIME,
                                         f"no block within the read timeout ({bound} s)", ctx.uid)
            raise FuseError(errno.ETIME) from None
        except ReaderGone:
            raise FuseError(errno.EINTR) from None
        except IntegrityError as e:
            self.service.counters["read_errors"] += 1
            log.warning("refusing to serve: %s", e)
            block = getattr(e, "index", None) if not getattr(e, "tree", 0) else None
            self.service.note_read_error(target, offset // BLOCK_SIZE if block is None else block,
                                         errno.EIO, str(e), ctx.uid)
            raise FuseError(errno.EIO) from None

    def _adopt(self, ino: int, fh: int) -> tuple[Inode | bytes, int]:
        """A handle this daemon did not open: an earlier daemon on the same
        connection did (see supervisor.py). The node id says what it is."""
        if ino >= SPECIAL_BASE:
            target: Inode | bytes = self._special_content(ino)
        else:
            target = self._node(ino)
            if not target.is_reg:
                raise FuseError(errno.EBADF)
        self._files[fh] = (target, 0)
        return target, 0

    def _remember_spared(self, key: tuple[int, int]) -> None:
        self._spared[key] = None
        if len(self._spared) > SPARED_LIMIT:
            self._spared.popitem(last=False)

    def release(self, ino: int, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is not None and self.passthrough is not None and not isinstance(handle[0], bytes):
            self.passthrough.release(handle[0])

    def _special_content(self, ino: int) -> bytes:
        if ino == SPECIAL_FILES[b"status"]:
            return (json.dumps(self.service.status(), indent=2, sort_keys=True) + "\n").encode()
        if ino == SPECIAL_FILES[b"pending"]:
            lines = [f"{pr.serial} {pr.ino} {'hash' if pr.tree else 'data'} {pr.index} {pr.time_ns}"
                     for pr in self.service.waits.newer_than(0, limit=1 << 30)]
            return ("".join(line + "\n" for line in lines)).encode()
        if ino == SPECIAL_FILES[b"control"]:
            return (self.control_path + "\n").encode()
        raise FuseError(errno.EISDIR)

    # --- extended attributes -------------------------------------------------------

    def listxattr(self, ino: int, ctx: Context) -> list[bytes]:
        """The image's own attributes only: incfs's user.incfs.* ones are
        readable by name but not listed, so cp -a, rsync -X and tar --xattrs
        copy just what the image holds."""
        if ino >= SPECIAL_BASE:
            return []
        names = sorted(self._node(ino).xattrs)
        # The kernel lets only CAP_SYS_ADMIN read trusted.* (ENODATA to
        # others) and ext4 lists them to no one else: do the same, so a
        # normal user's getfattr -d or cp -a neither sees nor trips on them.
        if any(n.startswith(TRUSTED_PREFIX) for n in names) and not caller_is_admin(ctx):
            names = [n for n in names if not n.startswith(TRUSTED_PREFIX)]
        return names

    def getxattr(self, ino: int, name: bytes, ctx: Context) -> bytes:
        if ino >= SPECIAL_BASE:
            raise FuseError(errno.ENODATA)
        if name not in INCFS_XATTRS and not self.ns.may_have_xattrs(ino):
            raise FuseError(errno.ENODATA)
        node = self._node(ino)
        stored = node.xattrs.get(name)
        if stored is not None:
            return stored
        own = self._incfs_xattr(node, name)
        if own is None:
            raise FuseError(errno.ENODATA)
        return own

    def _incfs_xattr(self, node: Inode, name: bytes) -> bytes | None:
        if name == INCFS_XATTRS[0]:
            return node.file_id.hex().encode()
        if name == INCFS_XATTRS[1]:
            return node.metadata
        if not node.is_reg:
            return None
        if name == INCFS_XATTRS[2]:
            return (b"sha256:" + self.service.image.file_digest(node).hex().encode()
                    if node.has_tree else b"")
        if name == INCFS_XATTRS[3]:
            return f"{node.data.present}/{node.data.count}".encode()
        if name == INCFS_XATTRS[4]:
            return (self.passthrough.mode_of(node) if self.passthrough else "daemon").encode()
        return None

    # --- the file system ---------------------------------------------------------

    def statfs(self, ino: int, ctx: Context) -> StatFs:
        totals = self.service.image.totals()
        return StatFs(blocks=totals["blocks_total"], files=totals["inodes"],
                      bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, namelen=255)

