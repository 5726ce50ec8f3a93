"""What a file system built on this session layer implements, and the types
it answers with.

Handlers are plain functions except `read`, which may wait (for a block that
is still arriving) and so is a coroutine run in its own task. Raise
`FuseError(errno)` to answer with an error. Inode numbers are the
file system's own and must stay valid for the life of the connection (the
kernel keeps them as node ids).
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from . import abi
from .dirents import Listing

NS = 1_000_000_000


class FuseError(Exception):
    def __init__(self, code: int, message: str = ""):
        super().__init__(code, message or errno.errorcode.get(code, str(code)))
        self.errno = code


class Attr(NamedTuple):
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 4096
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    def pack(self) -> bytes:
        return abi.ATTR.pack(*self.fields())

    def fields(self) -> tuple:
        """fuse_attr's fields in order."""
        blocks = (self.size + 511) // 512
        return (self.ino, self.size, blocks,
                self.atime_ns // NS, self.mtime_ns // NS, self.ctime_ns // NS,
                self.atime_ns % NS, self.mtime_ns % NS, self.ctime_ns % NS,
                self.mode, self.nlink, self.uid, self.gid,
                _encode_rdev(self.rdev), self.blksize, 0)

    @property
    def dirent_type(self) -> int:
        return stat.S_IFMT(self.mode) >> 12


def _encode_rdev(rdev: int) -> int:
    """fuse_attr.rdev is the kernel's new_encode_dev of a dev_t (32 bits):
    what os.makedev gives for majors < 4096 and minors < 2^20."""
    return rdev & 0xFFFFFFFF


class Entry(NamedTuple):
    """A looked-up name: its attributes and how long the kernel may cache the
    name (entry_timeout) and the attributes (attr_timeout), in seconds. An
    `ino` of 0 caches a negative entry."""
    attr: Attr
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    generation: int = 0

    def pack(self) -> bytes:
        ev, evn = _split(self.entry_timeout)
        av, avn = _split(self.attr_timeout)
        return abi.ENTRY_OUT.pack(self.attr.ino, self.generation, ev, av, evn, avn,
                                  *self.attr.fields())


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * NS)


def pack_entry(ino: int, mode: int, size: int, nlink: int, uid: int, gid: int, rdev: int,
               time_ns: int, timeout: float, blksize: int = 4096) -> bytes:
    """Entry(Attr(ino, mode, size, nlink, uid, gid, rdev, blksize, time_ns
    as atime, mtime and ctime), timeout, timeout).pack(), without making
    the two objects: a READDIRPLUS reply packs one per entry."""
    whole, part = _split(timeout)
    sec, nsec = divmod(time_ns, NS)
    return abi.ENTRY_OUT.pack(ino, 0, whole, whole, part, part, ino, size, (size + 511) // 512,
                              sec, sec, sec, nsec, nsec, nsec, mode, nlink, uid, gid,
                              _encode_rdev(rdev), blksize, 0)


def pack_attr_out(attr: Attr, timeout: float) -> bytes:
    av, avn = _split(timeout)
    return abi.ATTR_OUT_HEAD.pack(av, avn, 0) + attr.pack()


class Opened(NamedTuple):
    """An open's answer: the handle the kernel passes back, FOPEN_* flags and,
    with FOPEN_PASSTHROUGH, the backing id from `Session.backing_open`."""
    fh: int
    flags: abi.OpenFlag = abi.OpenFlag(0)
    backing_id: int = 0


class StatFs(NamedTuple):
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096

    def pack(self) -> bytes:
        return abi.KSTATFS.pack(self.blocks, self.bfree, self.bavail, self.files, self.ffree,
                                self.bsize, self.namelen, self.frsize)


class Context(NamedTuple):
    """Who asks: the caller's ids as the kernel saw them, and the request."""
    uid: int
    gid: int
    pid: int
    unique: int


@dataclass
class Connection:
    """What INIT settled, told to the file system before any other request.
    It outlives a daemon: a new one resuming the connection gets it from the
    one before (`as_dict`/`from_dict`), since the kernel sends INIT once."""
    minor: int
    flags: abi.InitFlag
    max_readahead: int
    max_pages: int
    passthrough: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"minor": self.minor, "flags": int(self.flags),
                "max_readahead": self.max_readahead, "max_pages": self.max_pages,
                "passthrough": self.passthrough, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> "Connection":
        return cls(minor=int(d["minor"]), flags=abi.InitFlag(int(d["flags"])),
                   max_readahead=int(d["max_readahead"]), max_pages=int(d["max_pages"]),
                   passthrough=bool(d["passthrough"]), notes=list(d.get("notes", [])))


class Operations:
    """A read-only file system. Everything not overridden answers ENOSYS (or
    EROFS for requests that would change something, in the session)."""

    def init(self, conn: Connection) -> None:
        pass

    def destroy(self) -> None:
        pass

    def lookup(self, parent: int, name: bytes, ctx: Context) -> Entry:
        raise FuseError(errno.ENOSYS)

    def forget(self, items: list[tuple[int, int]]) -> None:
        pass

    def getattr(self, ino: int, ctx: Context) -> tuple[Attr, float]:
        raise FuseError(errno.ENOSYS)

    def readlink(self, ino: int, ctx: Context) -> bytes:
        raise FuseError(errno.ENOSYS)

    def open(self, ino: int, flags: int, ctx: Context) -> Opened:
        raise FuseError(errno.ENOSYS)

    async def read(self, ino: int, fh: int, offset: int, size: int, ctx: Context) -> bytes:
        raise FuseError(errno.ENOSYS)

    def flush(self, ino: int, fh: int, ctx: Context) -> None:
        pass

    def release(self, ino: int, fh: int) -> None:
        pass

    def opendir(self, ino: int, flags: int, ctx: Context) -> Opened:
        raise FuseError(errno.ENOSYS)

    def listing(self, ino: int, fh: int, offset: int, ctx: Context) -> Listing:
        """The directory's entries for a READDIR(PLUS) from entry `offset`:
        the same Listing for every offset of one pass (keep it), so that
        offsets mean the same entries."""
        raise FuseError(errno.ENOSYS)

    def listed_entry(self, ino: int, d_type: int, ctx: Context) -> bytes | None:
        """A listed inode's packed fuse_entry_out (`Entry.pack()`), for
        READDIRPLUS, listed with `d_type`; None leaves the entry out of the
        reply."""
        try:
            attr, timeout = self.getattr(ino, ctx)
        except FuseError:
            return None
        return Entry(attr, timeout, timeout).pack()

    def releasedir(self, ino: int, fh: int) -> None:
        pass

    def idle(self) -> bool:
        """Called when no request is waiting: do one short piece of work
        that later requests will likely need, and say whether there was
        any (the session then looks for a request before calling again)."""
        return False

    def statfs(self, ino: int, ctx: Context) -> StatFs:
        return StatFs()

    def getxattr(self, ino: int, name: bytes, ctx: Context) -> bytes:
        raise FuseError(errno.ENODATA)

    def listxattr(self, ino: int, ctx: Context) -> list[bytes]:
        return []

    def access(self, ino: int, mask: int, ctx: Context) -> None:
        pass

