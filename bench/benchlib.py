"""Small helpers shared by the benchmark modules: timing, caches, tools.

Every figure the benchmark reports is a ratio against a reference measured in
the same run, so nothing here knows about absolute targets.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class Unavailable(Exception):
    """A system or case cannot run on this machine; the message says why."""


# --- caches -------------------------------------------------------------------

def drop_caches() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: page cache, dentries, inodes."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:  # not root: cold cases would be lies
        raise Unavailable(f"cannot drop the page cache ({e.strerror}); run as root") from None


def evict_file(path: str | os.PathLike) -> None:
    """Drop one file's own pages (POSIX_FADV_DONTNEED), leaving whatever is
    below it (a FUSE daemon's backing image, an EROFS image file) cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(path: str | os.PathLike, bufsize: int = MiB) -> int:
    """Read a file start to end with `bufsize` reads; returns the byte count."""
    fd = os.open(path, os.O_RDONLY)
    n = 0
    try:
        while True:
            b = os.read(fd, bufsize)
            if not b:
                return n
            n += len(b)
    finally:
        os.close(fd)


# --- timing ---------------------------------------------------------------------

class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Samples:
    """Raw per-repetition values of one (case, system) cell."""

    unit: str
    higher_is_better: bool
    values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return median(self.values)


# --- tools ----------------------------------------------------------------------

def which(tool: str) -> str | None:
    return shutil.which(tool)


def run(argv: list[str], *, check: bool = True, timeout: float | None = 600,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, timeout=timeout, stdout=kw.pop("stdout", subprocess.PIPE),
                          stderr=kw.pop("stderr", subprocess.PIPE), text=kw.pop("text", True), **kw)


# --- mount(2) and umount(2) ---------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MS_RDONLY = 1
MNT_DETACH = 2


def sys_mount(source: str, target: str, fstype: str, flags: int = MS_RDONLY,
              data: str | None = None) -> None:
    """mount(2) itself: util-linux mount(8) would set up a loop device for a
    file source, and the point of a file-backed EROFS mount is not to."""
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount({source}, {target}, {fstype}): {os.strerror(e)}")


def sys_umount(target: str, lazy: bool = False) -> None:
    rc = _libc.umount2(target.encode(), MNT_DETACH if lazy else 0)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount({target}): {os.strerror(e)}")


def fuse_umount(mountpoint: str, timeout: float = 30.0) -> None:
    """Unmount a FUSE mount made by another tool and wait until it is gone."""
    subprocess.run(["fusermount3", "-u", mountpoint], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_mounted(mountpoint: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise Unavailable(f"mount process exited with {proc.returncode}: {str(err).strip()[:300]}")
        if time.monotonic() > deadline:
            raise Unavailable(f"{mountpoint} not mounted after {timeout:.0f}s")
        time.sleep(0.01)


def clean_mountpoint(mountpoint: str) -> None:
    """Leave `mountpoint` an empty, unmounted directory (best effort)."""
    with contextlib.suppress(OSError):
        for _ in range(3):
            if not os.path.ismount(mountpoint):
                break
            try:
                sys_umount(mountpoint, lazy=True)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT):
                    break
                fuse_umount(mountpoint)
    os.makedirs(mountpoint, exist_ok=True)


# --- the machine --------------------------------------------------------------------

def machine_info() -> dict:
    info: dict = {"nproc": os.cpu_count(), "kernel": os.uname().release,
                  "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["disk"] = run(["df", "-h", "--output=source,fstype,size", str(REPO)]).stdout.split("\n")[1]
    with contextlib.suppress(OSError):
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    return info
