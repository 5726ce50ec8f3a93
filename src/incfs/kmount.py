"""Small wrappers over the kernel's mount calls and the mount table, shared by
`mount` (umount, the fusectl abort) and `native` (hand-off).

mount(2), open_tree(2) and move_mount(2) are called through ctypes: mount(8)
from util-linux 2.38 would make a loop device for a file-backed EROFS image,
and it has no way to keep a detached copy of a mount to put back.

The mount table is read from /proc/self/mountinfo, never by stat() of the
mount point: stat() of a FUSE mount whose daemon hangs hangs too.
"""

from __future__ import annotations

import errno
import os
import re
from typing import NamedTuple
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

AT_FDCWD = -100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
# x86_64 and aarch64 (asm-generic) share these numbers since Linux 5.2
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429

FUSECTL = "/sys/fs/fuse/connections"

_LIBC = None


def _libc():
    """libc through ctypes, loaded at the first call: importing ctypes takes
    ~2.5 ms, which the `incfs mount` command (it only reads the mount table)
    would pay before its mount starts. dlopen(NULL): the process's own
    symbols, libc among them; find_library("c") would run `ldconfig -p` in a
    subprocess."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        _LIBC = lib
    return _LIBC


def _check(rc: int, what: str) -> int:
    if rc < 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{what} failed: {os.strerror(code)}")
    return rc


def mount(source: str, target: str, fstype: str, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2); raises OSError with the errno."""
    import ctypes

    _check(_libc().mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype),
                       ctypes.c_ulong(flags), os.fsencode(data) if data else None),
           f"mount -t {fstype} {source} {target}")


MNT_FORCE = 1
MNT_DETACH = 2


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2) without mount(8) (no umount.<type> helper runs)."""
    import ctypes

    _check(_libc().umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount {target}")


def open_tree_clone(path: str) -> int:
    """A file descriptor holding a detached copy of the mount at `path` (the
    same superblock: for FUSE, the same connection), to attach again later
    with `move_mount_to`. Closing the fd dissolves the copy."""
    import ctypes

    return _check(_libc().syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD),
                                os.fsencode(path),
                                ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)),
                  f"open_tree {path}")


def move_mount_to(fd: int, target: str) -> None:
    """Attach the detached mount held by `fd` at `target`."""
    import ctypes

    _check(_libc().syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(fd), b"",
                         ctypes.c_int(AT_FDCWD), os.fsencode(target),
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           f"move_mount {target}")


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo, as far as we read it."""
    mount_id: int
    major: int
    minor: int
    target: str
    fstype: str
    source: str
    options: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(pid: int | str = "self") -> list[MountEntry]:
    """A process's mount table (this one's by default), in mount order (a
    later entry on the same path is stacked on top of an earlier one)."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            out.append(MountEntry(int(fields[0]), int(major), int(minor), _unescape(fields[4]),
                                  _unescape(fields[sep + 1]), _unescape(fields[sep + 2]),
                                  fields[5]))
    return out


def mount_at(path: str | os.PathLike) -> MountEntry | None:
    """The mount visible at `path` (the top one), or None. Never touches the
    file system mounted there, so it does not hang on a hung FUSE daemon."""
    found = None
    target = _resolve(path)
    for entry in mounts():
        if entry.target == target:
            found = entry
    return found


def fuse_device_at(path: str | os.PathLike) -> tuple[int, int] | None:
    """(major, minor) of the FUSE mount visible at `path`, or None (nothing
    mounted there, or not FUSE): a connection's device number, from the
    mount table alone."""
    entry = mount_at(path)
    return (entry.major, entry.minor) if entry is not None and entry.is_fuse else None


def _resolve(path) -> str:
    """realpath of the parent joined with the last name: the mount root itself
    is never looked at (its daemon may hang or be gone)."""
    path = os.path.abspath(os.fspath(path)).rstrip("/") or "/"
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else "/"


def ensure_fusectl() -> bool:
    """Make sure the fusectl file system is mounted at /sys/fs/fuse/connections
    (mounting it as root when it is missing); True if it is there."""
    if any(e.target == FUSECTL and e.fstype == "fusectl" for e in mounts()):
        return True
    if os.geteuid() != 0 or not Path(FUSECTL).is_dir():
        return False
    try:
        mount("fusectl", FUSECTL, "fusectl", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        if e.errno != errno.EBUSY:  # EBUSY: someone else just mounted it
            return False
    return True


def abort_fuse_connection(minor: int) -> bool:
    """Abort FUSE connection number `minor` through fusectl: its daemon's next
    read of /dev/fuse fails with ENODEV and the daemon ends. True if done."""
    if not ensure_fusectl():
        return False
    try:
        Path(f"{FUSECTL}/{minor}/abort").write_text("1")
        return True
    except OSError:
        return False
