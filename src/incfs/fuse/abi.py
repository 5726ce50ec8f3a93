"""The FUSE kernel protocol's numbers and structs (include/uapi/linux/fuse.h).

Only what a read-only file system speaks. Every struct is a `struct.Struct`
in native byte order with the kernel's field order and padding; the sizes
are checked against the header's in tests/fuse/test_abi.py. Names follow
the header (without the `fuse_` prefix) so the two can be read side by side.
"""

from __future__ import annotations

import enum
import struct

KERNEL_MAJOR = 7
# The newest minor we speak. The reply uses min(kernel's, ours): every struct
# we send has the layout of that minor (see INIT in session.py).
OUR_MINOR = 45
OLDEST_MINOR = 31  # max_pages, cache_dir, cache_symlinks, map_alignment: 7.28-7.31
ROOT_ID = 1
MIN_READ_BUFFER = 8192


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


# Requests that would change the tree: answered EROFS (a read-only mount
# never gets most of them, but a hostile or buggy caller may send them).
MODIFYING = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR,
                       Op.RENAME, Op.RENAME2, Op.LINK, Op.WRITE, Op.SETXATTR,
                       Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.COPY_FILE_RANGE,
                       Op.COPY_FILE_RANGE_64, Op.TMPFILE})


class Notify(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7


class InitFlag(enum.IntFlag):
    """fuse_init_in/out flags; bits 32-63 travel in flags2."""
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class OpenFlag(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


GETATTR_FH = 1 << 0
# The high bit of `unique` marks a request the kernel resent (FUSE_HAS_RESEND).
RESEND_BIT = 1 << 63

# --- structs ---------------------------------------------------------------------

IN_HEADER = struct.Struct("=IIQQIIIHH")      # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")           # len error unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")    # ino size blocks a/m/ctime a/m/ctimensec mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("=QQQQII")    # nodeid generation entry_valid attr_valid entry_nsec attr_nsec
ATTR_OUT_HEAD = struct.Struct("=QII")        # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("=IIIII44x")         # major minor max_readahead flags flags2 unused[11]
INIT_IN_OLD = struct.Struct("=IIII")         # before 7.36
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")  # ... flags2 max_stack_depth request_timeout unused[11]
OPEN_IN = struct.Struct("=II")               # flags open_flags
OPEN_OUT = struct.Struct("=QIi")             # fh open_flags backing_id (padding before 7.40)
READ_IN = struct.Struct("=QQIIQII")          # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("=QIIQ")          # fh flags release_flags lock_owner
FLUSH_IN = struct.Struct("=QIIQ")            # fh unused padding lock_owner
GETATTR_IN = struct.Struct("=IIQ")           # getattr_flags dummy fh
FORGET_IN = struct.Struct("=Q")              # nlookup
BATCH_FORGET_IN = struct.Struct("=II")       # count dummy
FORGET_ONE = struct.Struct("=QQ")            # nodeid nlookup
GETXATTR_IN = struct.Struct("=II")           # size padding
GETXATTR_OUT = struct.Struct("=II")          # size padding
ACCESS_IN = struct.Struct("=II")             # mask padding
INTERRUPT_IN = struct.Struct("=Q")           # unique
KSTATFS = struct.Struct("=QQQQQIII4x24x")    # blocks bfree bavail files ffree bsize namelen frsize pad spare[6]
DIRENT_HEAD = struct.Struct("=QQII")         # ino off namelen type
LSEEK_IN = struct.Struct("=QQI4x")           # fh offset whence
NOTIFY_INVAL_INODE = struct.Struct("=Qqq")   # ino off len
NOTIFY_INVAL_ENTRY = struct.Struct("=QII")   # parent namelen flags
NOTIFY_STORE = struct.Struct("=QQII")        # nodeid offset size padding
NOTIFY_DELETE = struct.Struct("=QQII")       # parent child namelen padding
BACKING_MAP = struct.Struct("=iIQ")          # fd flags padding

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size   # 128
ENTRY_OUT = struct.Struct(ENTRY_OUT_HEAD.format + ATTR.format[1:])  # the two in one pack
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size     # 104

# Sizes from include/uapi/linux/fuse.h, asserted in tests.
EXPECTED_SIZES = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "ATTR": 88, "ENTRY_OUT": 128, "ATTR_OUT": 104,
    "INIT_IN": 64, "INIT_OUT": 64, "OPEN_OUT": 16, "READ_IN": 40, "RELEASE_IN": 24,
    "FLUSH_IN": 24, "GETATTR_IN": 16, "KSTATFS": 80, "DIRENT_HEAD": 24,
    "NOTIFY_INVAL_INODE": 24, "NOTIFY_INVAL_ENTRY": 16, "NOTIFY_STORE": 24,
    "NOTIFY_DELETE": 24, "BACKING_MAP": 16, "LSEEK_IN": 24,
}


def dirent_size(namelen: int, plus: bool) -> int:
    """Bytes one (plus) directory entry takes, padded to 8 (FUSE_DIRENT_ALIGN)."""
    head = (ENTRY_OUT_SIZE if plus else 0) + DIRENT_HEAD.size
    return (head + namelen + 7) & ~7


# --- ioctls on /dev/fuse (FUSE_DEV_IOC_MAGIC 229) -----------------------------------

def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (229 << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)
