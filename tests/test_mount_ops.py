"""Operating a mount when things go wrong (issue 12, item 4): a daemon that
hangs before READY, a daemon that outlives its unmount, a FUSE connection
held open by another mount namespace, exit codes in the foreground and the
background, a hand-off whose mount(2) fails, and runtime directories left
behind. Real mounts and real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from incfs import ROOT_INO, kmount
from incfs.errors import IncfsError
from incfs.mount import MountConfig, mount_background, runtime_dir, umount
from incfs.native import kernel_has_erofs, swap_in_erofs
from incfs.pack import pack
from incfs.procs import process_alive
from mounting import daemon_pid, force_unmount, mounts, wait_gone  # noqa: F401  (fixture)

INCFS = [sys.executable, "-m", "incfs.cli"]


@pytest.fixture
def image(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello from incfs\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300 * 1024 + 5))
    pack(src, tmp_path / "a.img")
    return tmp_path / "a.img"


@pytest.fixture
def image_mount(image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source=str(image), mountpoint=str(mnt), allow_unsigned=True))
    pid = daemon_pid(mnt)
    try:
        yield mnt, pid
    finally:
        if kmount.mount_at(mnt) is not None:
            force_unmount(mnt, pid, grace=1.0)
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGCONT)  # a test that stopped it
            force_unmount(mnt, pid, grace=1.0)


def test_mount_gives_up_on_a_daemon_that_hangs_before_ready(mounts, tmp_path):
    """The source image is a file of another (empty) mount whose blocks never
    come and whose reads wait forever: the new daemon hangs reading its
    superblock. The mount fails after the deadline and nothing is left."""
    outer = mounts(read_timeout=None)
    with outer.client() as client:
        client.create_file(ROOT_INO, "never.img", size=1 << 20)
    mnt = tmp_path / "inner"
    mnt.mkdir()
    with pytest.raises(IncfsError, match="did not get ready within 3 s; it was killed") as info:
        mount_background(MountConfig(source=str(outer / "never.img"), mountpoint=str(mnt),
                                     allow_unsigned=True), ready_timeout=3)
    pid = int(str(info.value).split("(pid ")[1].split(")")[0])
    assert wait_gone(pid, 10), "the hung daemon is still alive"
    assert kmount.mount_at(mnt) is None
    assert not runtime_dir(str(mnt)).exists()
    assert outer.status()["pending_reads"] >= 0  # the outer mount still answers


def test_umount_aborts_a_connection_held_by_another_namespace(image_mount):
    """A copy of the mount in another mount namespace keeps the FUSE
    connection open, so the daemon never hears of the unmount. umount aborts
    tells the daemon, which closes exactly its own connection."""
    mnt, pid = image_mount
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        own_ns = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the copy exists
            try:
                if os.readlink(f"/proc/{holder.pid}/ns/mnt") != own_ns and \
                        os.readlink(f"/proc/{holder.pid}/exe").endswith("sleep"):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        umount(str(mnt), timeout=60, grace=1)
        assert not process_alive(pid)
        assert kmount.mount_at(mnt) is None
        assert not runtime_dir(str(mnt)).exists()
    finally:
        holder.kill()
        holder.wait()


def test_umount_fails_loudly_when_the_daemon_does_not_exit(image_mount):
    """A stopped daemon cannot exit after the unmount: umount kills it and
    says so, instead of returning as if all went well."""
    mnt, pid = image_mount
    assert (mnt / "a.txt").read_text() == "hello from incfs\n"
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(IncfsError, match=rf"daemon \(pid {pid}\) had not exited 2 s later.*killed"):
        umount(str(mnt), timeout=2, grace=0.5)
    assert wait_gone(pid, 10)
    assert kmount.mount_at(mnt) is None
    assert not runtime_dir(str(mnt)).exists()


def test_mount_and_umount_leave_no_runtime_directory(image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for _ in range(2):
            mount_background(MountConfig(source=str(image), mountpoint=str(mnt),
                                         allow_unsigned=True))
            assert (runtime_dir(str(mnt)) / "control.sock").exists()
            umount(str(mnt))
            assert not runtime_dir(str(mnt)).exists()
    finally:
        if kmount.mount_at(mnt) is not None:
            force_unmount(mnt, grace=2.0)
    with pytest.raises(IncfsError):  # a failed mount leaves nothing either
        mount_background(MountConfig(source=str(image), mountpoint=str(mnt)))
    assert not runtime_dir(str(mnt)).exists()


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("case,code", [("unsigned", 1), ("corrupt", 1), ("no-cache-dir", 2),
                                       ("missing", 2)])
def test_mount_errors_exit_the_same_in_foreground_and_background(image, tmp_path, foreground,
                                                                 case, code):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"not an image at all" * 500)
    args = {"unsigned": [image],
            "corrupt": [garbage, "--allow-unsigned"],
            "no-cache-dir": ["empty", "--cache", tmp_path / "no" / "such" / "dir" / "c.img"],
            "missing": [tmp_path / "missing.img", "--allow-unsigned"]}[case]
    cmd = INCFS + ["mount", *map(str, args[:1]), str(mnt), *map(str, args[1:])]
    if foreground:
        cmd.append("--foreground")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("incfs: error: "), proc.stderr
    assert kmount.mount_at(mnt) is None


@pytest.mark.skipif(not kernel_has_erofs(), reason="kernel lacks EROFS (CONFIG_EROFS_FS)")
def test_handoff_puts_the_fuse_mount_back_when_mount_fails(image_mount, tmp_path):
    """mount(2) of the EROFS image fails after the FUSE mount was detached:
    the FUSE mount is attached again, served by the same daemon."""
    mnt, pid = image_mount
    held = open(mnt / "a.txt", "rb")
    not_erofs = tmp_path / "not.erofs"
    not_erofs.write_bytes(bytes(64 * 1024))
    try:
        with pytest.raises(OSError, match="still the FUSE mount"):
            swap_in_erofs(str(mnt), not_erofs)
        entry = kmount.mount_at(mnt)
        assert entry is not None and entry.is_fuse
        assert daemon_pid(mnt) == pid and process_alive(pid)
        assert (mnt / "sub" / "b.bin").stat().st_size == 300 * 1024 + 5
        assert (mnt / "a.txt").read_text() == "hello from incfs\n"
        assert held.read() == b"hello from incfs\n"
        assert (mnt / ".incfs" / "status").exists()
    finally:
        held.close()
    umount(str(mnt))
    assert not process_alive(pid)
