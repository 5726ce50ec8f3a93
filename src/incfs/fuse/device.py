"""Getting a /dev/fuse connection mounted, and letting it go.

Two ways in, as libfuse has them, but without libfuse's gap (3.14 gives up
when /dev/fuse is not world-writable instead of falling back):

* root (CAP_SYS_ADMIN): open /dev/fuse and call mount(2) with `fd=N`;
* anyone else: run `fusermount3` (setuid root) with `_FUSE_COMMFD` naming one
  end of a socket pair; it opens /dev/fuse, mounts, and sends the fd back
  with SCM_RIGHTS.

Unmounting is umount2(2) as root and `fusermount3 -u` otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import subprocess
from typing import NamedTuple

from .. import kmount
from . import abi

DEVICE = "/dev/fuse"
FUSERMOUNT = "fusermount3"


class MountOptions(NamedTuple):
    """What the kernel is told at mount time (not negotiated later)."""
    fsname: str = "incfs"
    subtype: str = "incfs"
    allow_other: bool = False
    default_permissions: bool = True
    max_read: int = 0  # 0: no limit beyond max_pages
    # device nodes and setuid/setgid bits of the image take effect only when
    # asked for (a root mount of a trusted image used as a root file system)
    devices: bool = False
    setuid: bool = False

    def flags(self) -> int:
        return (kmount.MS_RDONLY | (0 if self.setuid else kmount.MS_NOSUID)
                | (0 if self.devices else kmount.MS_NODEV))

    def kernel_data(self, fd: int, rootmode: int) -> str:
        """mount(2)'s data string."""
        return ",".join([f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}", *self._shared()])

    def fusermount_options(self) -> str:
        """fusermount3's -o (it adds nosuid and nodev for normal users anyway)."""
        return ",".join(["ro", "nosuid", "nodev", f"fsname={_escape(self.fsname)}",
                         f"subtype={self.subtype}", *self._shared()])

    def _shared(self) -> list[str]:
        return ((["allow_other"] if self.allow_other else [])
                + (["default_permissions"] if self.default_permissions else [])
                + ([f"max_read={self.max_read}"] if self.max_read else []))


def _escape(value: str) -> str:
    """fsname goes into a comma-separated option list: commas and backslashes
    are escaped the way fusermount3 and mount(8) read them."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount(mountpoint: str, options: MountOptions) -> int:
    """Mount a new FUSE connection on `mountpoint`; returns its /dev/fuse fd
    (close-on-exec, non-blocking)."""
    if os.geteuid() == 0:
        fd = _mount_direct(mountpoint, options)
    else:
        fd = _mount_fusermount(mountpoint, options)
    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)
    return fd


def _mount_direct(mountpoint: str, options: MountOptions) -> int:
    fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
        fstype = f"fuse.{options.subtype}" if options.subtype else "fuse"
        kmount.mount(options.fsname, mountpoint, fstype, options.flags(),
                     options.kernel_data(fd, rootmode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_fusermount(mountpoint: str, options: MountOptions) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(
            [FUSERMOUNT, "-o", options.fusermount_options(), "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        theirs.close()
        fd = _receive_fd(ours)
        _, err = proc.communicate()
    if fd is None:
        message = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise OSError(errno.EPERM, f"fusermount3 could not mount: {message}", mountpoint)
    return fd


def _receive_fd(sock: socket.socket) -> int | None:
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except OSError:
        return None
    return fds[0] if fds else None


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Detach the mount (the daemon sees the connection end once the last
    user of the mount is gone)."""
    if os.geteuid() == 0:
        kmount.umount2(mountpoint, kmount.MNT_DETACH if lazy else 0)
        return
    cmd = [FUSERMOUNT, "-u"] + (["-z"] if lazy else []) + ["--", mountpoint]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(errno.EBUSY, done.stderr.strip() or "fusermount3 -u failed", mountpoint)


# --- passthrough backing files (FUSE 7.40, CONFIG_FUSE_PASSTHROUGH) ----------------

def backing_open(dev_fd: int, file_fd: int) -> int:
    """Register an open file as a passthrough backing file; returns its
    backing id for fuse_open_out. Needs CAP_SYS_ADMIN in the initial user
    namespace (the kernel's rule: a backing file gives the daemon's access)."""
    return _ioctl_int(dev_fd, abi.DEV_IOC_BACKING_OPEN, abi.BACKING_MAP.pack(file_fd, 0, 0))


def backing_close(dev_fd: int, backing_id: int) -> None:
    _ioctl_int(dev_fd, abi.DEV_IOC_BACKING_CLOSE, backing_id.to_bytes(4, "little"))


def _ioctl_int(fd: int, request: int, arg: bytes) -> int:
    """ioctl whose result is its return value: with a mutable buffer,
    fcntl.ioctl returns that value (with bytes it would return the buffer)."""
    return fcntl.ioctl(fd, request, bytearray(arg), True)
