"""Never drop a program: the supervisor keeps the FUSE connection while
daemons die (kill -9) or are replaced (`incfs restart`)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import Client
from incfs.rundir import runtime_dir
from incfs.procs import process_alive
from mounting import empty_mount, fork_child, mounted, mounts, wait_child, wait_until  # noqa: F401

MiB = 1 << 20


def daemon_pid(m) -> int:
    return int((runtime_dir(str(m.path)) / "pid").read_text())


def wait_new_daemon(m, old: int, timeout: float = 30.0) -> int:
    def served_by_new() -> bool:
        try:
            pid = daemon_pid(m)
            with Client.connect_socket(str(runtime_dir(str(m.path)) / "control.sock"), 5) as c:
                return pid != old and c.status()["pid"] == pid
        except (OSError, ValueError):
            return False
    wait_until(served_by_new, timeout=timeout, what="a new daemon")
    return daemon_pid(m)


class Streamers:
    """Threads reading files of the mount over and over, checking every byte."""

    def __init__(self, paths: list[Path], expected: dict[Path, bytes]):
        self.paths, self.expected = paths, expected
        self.errors: list[str] = []
        self.reads = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,)) for p in paths]

    def _run(self, path: Path) -> None:
        while not self._stop.is_set():
            try:
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    data = f.read()
                if data != self.expected[path]:
                    self.errors.append(f"{path}: wrong bytes")
                self.reads += 1
            except OSError as e:
                self.errors.append(f"{path}: {e}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)


@pytest.fixture
def image(tmp_path, incfs):
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for i in range(4):
        data = os.urandom(2 * MiB + i * 1000)
        (src / f"f{i}.bin").write_bytes(data)
        expected[f"f{i}.bin"] = data
    img = tmp_path / "app.img"
    incfs("pack", str(src), str(img))
    return img, expected


def test_kill_9_of_the_daemon_while_programs_stream(tmp_path, image):
    img, expected = image
    with mounted(tmp_path, str(img), allow_unsigned=True, passthrough=False) as m:
        paths = [m.path / name for name in expected]
        with Streamers(paths, {m.path / k: v for k, v in expected.items()}) as s:
            for _ in range(3):
                wait_until(lambda: s.reads > 8, timeout=60)
                old = daemon_pid(m)
                os.kill(old, signal.SIGKILL)
                wait_new_daemon(m, old)
                before = s.reads
                wait_until(lambda: s.reads > before + 8, timeout=60)
        assert s.errors == []
        status = m.status()
        assert status["restarts"] == 3 and status["supervisor_pid"]


def test_a_read_waiting_for_an_absent_block_survives_the_daemon(empty_mount):
    """The dead daemon had read the request; FUSE_NOTIFY_RESEND hands it to
    the new one, which waits for the block like the old one did."""
    m = empty_mount
    m.restart(read_timeout=None)
    block = os.urandom(BLOCK_SIZE)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "later.bin", size=BLOCK_SIZE)

    def reader():
        with open(m / "later.bin", "rb") as f:
            assert f.read() == block

    pid = fork_child(reader)
    wait_until(lambda: m.status()["pending_reads"] == 1, timeout=30)
    old = daemon_pid(m)
    os.kill(old, signal.SIGKILL)
    wait_new_daemon(m, old)
    wait_until(lambda: m.status()["pending_reads"] == 1, timeout=30, what="the resent read")
    with m.client() as c:
        c.fill_blocks(ino, [(0, block)])
    assert wait_child(pid, timeout=60) == 0


def test_incfs_restart_replaces_the_daemon_under_load(tmp_path, image, incfs):
    img, expected = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        paths = [m.path / name for name in expected]
        with Streamers(paths, {m.path / k: v for k, v in expected.items()}) as s:
            for _ in range(2):
                wait_until(lambda: s.reads > 4, timeout=60)
                old = daemon_pid(m)
                done = incfs("restart", str(m.path))
                new = daemon_pid(m)
                assert new != old and f"replaced by {new}" in done.stdout
                before = s.reads
                wait_until(lambda: s.reads > before + 4, timeout=60)
        assert s.errors == []
        status = m.status()
        assert status["restarts"] == 2 and status["version"]
        assert not process_alive(old)


def test_umount_works_while_no_daemon_can_start(tmp_path, image, incfs):
    """A new daemon that cannot start (its image is gone) does not hold up
    `incfs umount`: the supervisor backs off, and ends as soon as the
    connection does (not when it gives up, ~28 s of failures later),
    removing what the killed daemon left in the runtime directory.
    (umount(8) statfs()es the mount point first, which waits for a daemon:
    docs/reliability.md, "Known limits".)"""
    img, _ = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        rundir = runtime_dir(str(m.path))
        supervisor = int((rundir / "supervisor.pid").read_text())
        os.rename(img, img.with_suffix(".gone"))
        os.kill(daemon_pid(m), signal.SIGKILL)
        time.sleep(0.5)
        assert (rundir / "pid").exists() and (rundir / "control.sock").exists()
        done = incfs("umount", str(m.path))
        assert done.returncode == 0, done.stderr
        wait_until(lambda: not process_alive(supervisor), timeout=5, what="the supervisor")
        assert not rundir.exists(), sorted(p.name for p in rundir.iterdir())



def _no_daemon_can_start(m, img: Path) -> int:
    """Take the image away and kill the daemon: the supervisor (returned)
    backs off between daemons that fail."""
    supervisor = int((runtime_dir(str(m.path)) / "supervisor.pid").read_text())
    os.rename(img, img.with_suffix(".gone"))
    os.kill(daemon_pid(m), signal.SIGKILL)
    time.sleep(0.5)
    return supervisor


def test_sigterm_unmounts_while_no_daemon_can_start(tmp_path, image):
    """SIGTERM to the supervisor means what it means to a daemon, a lazy
    unmount, also when no daemon serves: the supervisor does it, and ends
    with the connection instead of backing off for ~28 s."""
    img, _ = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        supervisor = _no_daemon_can_start(m, img)
        os.kill(supervisor, signal.SIGTERM)
        wait_until(lambda: not process_alive(supervisor), timeout=10, what="the supervisor")
        assert not os.path.ismount(m.path)


def test_sigterm_leaves_another_mount_at_the_mount_point(tmp_path, image):
    """After a `umount -l` (a program still holds the mount, so the
    connection lives on), the path may hold another mount: a SIGTERM with no
    daemon serving does not detach that one."""
    img, _ = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        held = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            supervisor = _no_daemon_can_start(m, img)
            subprocess.run(["umount", "-l", str(m.path)], check=True)
            subprocess.run(["mount", "-t", "tmpfs", "other", str(m.path)], check=True)
            try:
                os.kill(supervisor, signal.SIGTERM)
                time.sleep(1.0)  # (the supervisor answers a signal within ms)
                assert os.path.ismount(m.path)
                assert process_alive(supervisor)  # a program still holds the connection
            finally:
                subprocess.run(["umount", str(m.path)], check=True)
        finally:
            os.close(held)
        wait_until(lambda: not process_alive(supervisor), timeout=60, what="the supervisor")

def test_restart_refuses_a_foreground_mount(tmp_path, image, incfs, one_line_error):
    img, _ = image
    with mounted(tmp_path, str(img), allow_unsigned=True, supervise=False) as m:
        done = incfs("restart", str(m.path))
        one_line_error(done, 2, "no supervised incfs daemon")


def test_a_supervisor_that_dies_leaves_the_daemon_serving(tmp_path, image, incfs):
    img, expected = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        rundir = runtime_dir(str(m.path))
        supervisor = int((rundir / "supervisor.pid").read_text())
        daemon = daemon_pid(m)
        os.kill(supervisor, signal.SIGKILL)
        wait_until(lambda: not process_alive(supervisor), timeout=10)
        for name, data in expected.items():
            assert (m.path / name).read_bytes() == data
        assert m.status()["pid"] == daemon
    assert not process_alive(daemon)  # it still ends at the unmount
    # and takes the dead supervisor's pid file with its own runtime files
    assert not rundir.exists(), sorted(p.name for p in rundir.iterdir())



def test_a_daemon_whose_supervisor_died_does_not_make_way(tmp_path, image):
    """A SIGUSR2 asks the daemon to end for the next one, which only the
    supervisor starts: once it is dead, making way would drop every program
    using the mount, so the daemon serves on."""
    img, expected = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        supervisor = int((runtime_dir(str(m.path)) / "supervisor.pid").read_text())
        daemon = daemon_pid(m)
        os.kill(supervisor, signal.SIGKILL)
        wait_until(lambda: not process_alive(supervisor), timeout=10)
        os.kill(daemon, signal.SIGUSR2)
        time.sleep(1.0)  # (a daemon making way ends within ms)
        assert process_alive(daemon)
        for name, data in expected.items():
            assert (m.path / name).read_bytes() == data
        assert m.status()["pid"] == daemon

def test_two_restarts_at_once(tmp_path, image):
    img, expected = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        paths = [m.path / name for name in expected]
        with Streamers(paths, {m.path / k: v for k, v in expected.items()}) as s:
            wait_until(lambda: s.reads > 4, timeout=60)
            old = daemon_pid(m)
            procs = [subprocess.Popen([sys.executable, "-m", "incfs.cli", "restart",
                                       str(m.path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [p.communicate(timeout=120) for p in procs]
            assert [p.returncode for p in procs] == [0, 0], results
            new = wait_new_daemon(m, old)
            before = s.reads
            wait_until(lambda: s.reads > before + 4, timeout=60)
        assert s.errors == []
        assert new != old


def test_a_burst_of_upgrade_requests_keeps_the_connection(tmp_path, image):
    """SIGUSR1s at random moments, some while a daemon is ending: the
    supervisor acts on them in its loop, never in a handler that could run
    between waitpid() reaping the daemon and its return code being noted
    (where signalling it raised ESRCH and ended the supervisor, and the
    mount with it). Requests during a handover join it."""
    img, expected = image
    rng = random.Random(7)
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        supervisor = int((runtime_dir(str(m.path)) / "supervisor.pid").read_text())
        paths = [m.path / name for name in expected]
        with Streamers(paths, {m.path / k: v for k, v in expected.items()}) as s:
            wait_until(lambda: s.reads > 4, timeout=60)
            first = daemon_pid(m)
            for _ in range(30):
                os.kill(supervisor, signal.SIGUSR1)
                time.sleep(rng.uniform(0, 0.08))
            new = wait_new_daemon(m, first, timeout=60)
            before = s.reads
            wait_until(lambda: s.reads > before + 4, timeout=60)
        assert s.errors == []
        assert process_alive(supervisor) and new != first
        assert m.status()["restarts"] >= 1
