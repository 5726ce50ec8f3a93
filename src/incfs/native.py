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

import os
import shutil
import subprocess
from pathlib import Path

from . import kmount
from .errors import IncfsError, UsageError
from .statusfile import read_status

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
    kmount.mount(os.path.abspath(image), os.path.abspath(mountpoint), "erofs",
                 kmount.MS_RDONLY | kmount.MS_NODEV | kmount.MS_NOSUID)


def handoff(mountpoint: str, erofs_image: str | os.PathLike | None = None) -> Path:
    """Replace a complete incfs mount by a kernel EROFS mount of the same tree."""
    status = read_status(mountpoint)
    if not status["complete"]:
        raise UsageError(f"{mountpoint} is not complete yet "
                         f"({status['blocks_present']}/{status['blocks_total']} blocks)")
    image = Path(erofs_image) if erofs_image else Path(status["image"]).with_suffix(".erofs")
    build_erofs(mountpoint, image)
    swap_in_erofs(mountpoint, image)
    return image


def swap_in_erofs(mountpoint: str, image: str | os.PathLike) -> None:
    """Detach the FUSE mount at `mountpoint` lazily (programs holding files
    open keep being served by the daemon until they close them) and mount the
    EROFS `image` there.

    If mount(2) fails, the FUSE mount is put back where it was, served by the
    same daemon: a detached copy of it (open_tree(2), same connection) is
    taken before the lazy unmount and attached again with move_mount(2)."""
    if not kernel_has_erofs():
        raise UsageError("this kernel has no EROFS (CONFIG_EROFS_FS)")
    try:
        spare = kmount.open_tree_clone(mountpoint)
    except OSError as e:
        raise OSError(e.errno, f"cannot keep a copy of {mountpoint} to roll back to "
                               f"({e.strerror}); nothing was changed") from None
    try:
        kmount.umount2(mountpoint, kmount.MNT_DETACH)
        try:
            mount_erofs_file(image, mountpoint)
        except OSError as e:
            try:
                kmount.move_mount_to(spare, mountpoint)
            except OSError as back:
                raise OSError(e.errno, f"{e.strerror}; putting the FUSE mount back failed "
                                       f"too ({back.strerror}): {mountpoint} is empty") from None
            raise OSError(e.errno, f"{e.strerror}; {mountpoint} is still the FUSE mount") from None
    finally:
        os.close(spare)
