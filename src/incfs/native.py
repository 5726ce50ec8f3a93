"""Native hand-off (R11): once every block is here, serve from the kernel.

`handoff(mountpoint)` builds an EROFS image of the complete mount with
mkfs.erofs, lazily detaches the FUSE mount (programs that still hold files
open keep being served by the daemon until they close them) and mounts the
EROFS image on the same path with mount(2) straight from the file: no loop
device (util-linux's mount(8) 2.38 would make one, so we call mount(2)).

This version copies the data into the EROFS image (twice the disk space while
both exist). A zero-copy variant whose chunk indexes point into the backing
image's 4 KiB-aligned raw blocks is possible with this format and is the
planned next step; see docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
from pathlib import Path

from .errors import IncfsError, UsageError
from .statusfile import read_status

MS_RDONLY = 1
MS_NODEV = 4
MS_NOSUID = 2


def kernel_has_erofs() -> bool:
    try:
        return any(line.split()[-1] == "erofs"
                   for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def build_erofs(tree: str | os.PathLike, out: str | os.PathLike) -> Path:
    """mkfs.erofs of a directory tree (uncompressed, mtimes preserved)."""
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise UsageError("mkfs.erofs is missing (apt install erofs-utils)")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    done = subprocess.run([mkfs, "--quiet", "--preserve-mtime", "-x-1", str(tmp), str(tree)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise IncfsError(f"mkfs.erofs failed: {done.stderr.strip() or done.returncode}")
    os.replace(tmp, out)
    return out


def mount_erofs_file(image: str | os.PathLike, mountpoint: str | os.PathLike) -> None:
    """mount(2) an EROFS image file directly (file-backed, no loop device)."""
    if not kernel_has_erofs():
        raise UsageError("this kernel has no EROFS (CONFIG_EROFS_FS)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    rc = libc.mount(os.fsencode(os.path.abspath(image)), os.fsencode(os.path.abspath(mountpoint)),
                    b"erofs", MS_RDONLY | MS_NODEV | MS_NOSUID, None)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount -t erofs {image} failed: {os.strerror(code)}")


def handoff(mountpoint: str, erofs_image: str | os.PathLike | None = None) -> Path:
    """Replace a complete incfs mount by a kernel EROFS mount of the same tree."""
    status = read_status(mountpoint)
    if not status["complete"]:
        raise UsageError(f"{mountpoint} is not complete yet "
                         f"({status['blocks_present']}/{status['blocks_total']} blocks)")
    image = Path(erofs_image) if erofs_image else Path(status["image"]).with_suffix(".erofs")
    build_erofs(mountpoint, image)
    detach = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
    if detach.returncode != 0:
        raise OSError(errno.EBUSY, detach.stderr.strip() or "umount -l failed")
    mount_erofs_file(image, mountpoint)
    return image
