"""The file systems compared on local (complete) data.

Each system turns the local tree into whatever it serves from (an image, or
nothing for native ext4), then mounts it and yields the root that holds the
same tree. `prepare` runs once per benchmark run; `mounted` once per
repetition, so every repetition starts from a fresh daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from benchlib import (Unavailable, clean_mountpoint, fuse_umount, run, sys_mount, sys_umount,
                      wait_mounted, which)


class System:
    name = "?"
    label = "?"
    reference = False

    def __init__(self) -> None:
        self.image: Path | None = None
        self.unavailable: str | None = None
        self.memory: list[dict] = []  # daemon memory after each repetition
        self.failures: list[str] = []

    def prepare(self, tree_root: Path, work: Path) -> None:
        """Build what the system serves from; raise Unavailable if it cannot run."""

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        raise NotImplementedError
        yield mountpoint

    @property
    def daemon_pid(self) -> int | None:
        return None

    def describe(self) -> dict:
        d = {"label": self.label, "available": self.unavailable is None}
        if self.unavailable:
            d["unavailable"] = self.unavailable
        if self.image is not None and self.image.exists():
            d["image_bytes"] = self.image.stat().st_size
        if self.memory:
            d["daemon_memory"] = self.memory
        if self.failures:
            d["failures"] = self.failures
        return d


class Native(System):
    name, label, reference = "native", "ext4 (native)", True

    def prepare(self, tree_root: Path, work: Path) -> None:
        self.root = tree_root

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        yield self.root


class Incfs(System):
    """incfs over a packed local image. With passthrough (the default), each
    mount first opens every file once and waits until the daemon has
    expanded (or re-verified) it: complete files are then read by the
    kernel, which is what "once complete" means (docs/fuse.md). Without,
    every byte goes through the daemon: the path of files still loading."""

    def __init__(self, compress: str, passthrough: bool = True) -> None:
        super().__init__()
        self.compress = compress
        self.passthrough = passthrough
        kind = "raw" if compress == "none" else compress
        self.name = f"incfs-{kind}" + ("" if passthrough else "-daemon")
        self.label = f"incfs {kind}" + ("" if passthrough else " (daemon path)")
        self._pid: int | None = None

    def prepare(self, tree_root: Path, work: Path) -> None:
        from incfs.pack import pack
        self.image = work / f"{self.name}.img"
        self.image.unlink(missing_ok=True)
        pack(tree_root, self.image, compress=self.compress)

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        from incfs.mount import MountConfig, mount_background, umount
        clean_mountpoint(str(mountpoint))
        mount_background(MountConfig(source=str(self.image), mountpoint=str(mountpoint),
                                     allow_unsigned=True, prefetch="none",
                                     passthrough=self.passthrough))
        try:
            self._pid = read_status(mountpoint).get("pid")
            if self.passthrough:
                expand_all(mountpoint)
            yield mountpoint
        finally:
            self._pid = None
            umount(str(mountpoint))

    @property
    def daemon_pid(self) -> int | None:
        return self._pid


def expand_all(mountpoint: Path, timeout: float = 600.0) -> int:
    """Open every regular file once (which starts its expansion) and wait
    until the daemon has a plain file for each; returns how many (hard
    links count once; symlinks and device nodes are not opened)."""
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(mountpoint):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                with open(path, "rb"):
                    pass
    count = len(seen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pt = read_status(mountpoint).get("fuse", {}).get("passthrough")
        if pt is None:
            return 0  # no passthrough here (kernel, privileges): nothing to wait for
        if pt["files_expanded"] + pt["files_reverified"] + pt["expand_errors"] >= count:
            return count
        time.sleep(0.1)
    raise Unavailable(f"files not expanded within {timeout:g} s")


class Erofs(System):
    """Kernel EROFS mounted straight from the image file (no loop device)."""

    name, label = "erofs", "EROFS (kernel, file)"

    def prepare(self, tree_root: Path, work: Path) -> None:
        filesystems = Path("/proc/filesystems").read_text()
        if "erofs" not in filesystems.split():
            raise Unavailable("the kernel has no EROFS (CONFIG_EROFS_FS)")
        if not which("mkfs.erofs"):
            raise Unavailable("mkfs.erofs missing (apt-get install erofs-utils)")
        self.image = work / "erofs.img"
        self.image.unlink(missing_ok=True)
        run(["mkfs.erofs", "--quiet", str(self.image), str(tree_root)])

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        clean_mountpoint(str(mountpoint))
        try:
            sys_mount(str(self.image), str(mountpoint), "erofs")
        except OSError as e:
            if e.errno == errno.ENOTBLK:
                raise Unavailable("the kernel cannot mount EROFS from a regular file "
                                  "(CONFIG_EROFS_FS_BACKED_BY_FILE)") from None
            raise Unavailable(f"EROFS mount failed: {e}") from None
        try:
            yield mountpoint
        finally:
            sys_umount(str(mountpoint))


class Squashfuse(System):
    name, label = "squashfuse", "squashfuse (zstd)"

    def prepare(self, tree_root: Path, work: Path) -> None:
        if not which("mksquashfs"):
            raise Unavailable("mksquashfs missing (apt-get install squashfs-tools)")
        if not which("squashfuse"):
            raise Unavailable("squashfuse missing (apt-get install squashfuse)")
        self.image = work / "squash.img"
        self.image.unlink(missing_ok=True)
        run(["mksquashfs", str(tree_root), str(self.image), "-comp", "zstd", "-noappend",
             "-quiet", "-no-progress", "-processors", "2"])

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        clean_mountpoint(str(mountpoint))
        proc = subprocess.run(["squashfuse", "-o", "allow_other", str(self.image), str(mountpoint)],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise Unavailable(f"squashfuse failed: {proc.stderr.strip()[:200]}")
        wait_mounted(str(mountpoint))
        try:
            yield mountpoint
        finally:
            fuse_umount(str(mountpoint))


class PassFS(System):
    """The throwaway pyfuse3 passthrough (bench/passfs.py): the daemon reference."""

    name, label = "passfs", "pyfuse3 passthrough"

    def prepare(self, tree_root: Path, work: Path) -> None:
        self.root = tree_root
        self._proc: subprocess.Popen | None = None

    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        clean_mountpoint(str(mountpoint))
        script = Path(__file__).with_name("passfs.py")
        self._proc = subprocess.Popen([sys.executable, str(script), str(self.root), str(mountpoint)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_mounted(str(mountpoint), proc=self._proc)
            yield mountpoint
        finally:
            fuse_umount(str(mountpoint))
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def daemon_memory(pid: int | None) -> dict:
    """VmRSS and VmHWM (peak) of a daemon, in bytes."""
    out: dict = {}
    if not pid:
        return out
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def read_status(mountpoint: Path) -> dict:
    import json
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(mountpoint) / ".incfs" / "status").read_text())
    return {}


def local_systems() -> list[System]:
    return [Native(), PassFS(), Incfs("none"), Incfs("lz4"), Incfs("zstd"),
            Incfs("none", passthrough=False), Erofs(), Squashfuse()]


def proc_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
