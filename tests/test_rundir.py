"""A mount's runtime directory after a daemon or supervisor was killed
(incfs.rundir): what the dead process left goes, what a newer one made
stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from incfs.rundir import drop_daemon_leftovers, drop_pid_file


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftovers(rundir: Path, pid: int) -> None:
    rundir.mkdir()
    (rundir / "control.sock").write_bytes(b"")  # a socket's name: only its age matters here
    time.sleep(0.01)
    (rundir / "pid").write_text(f"{pid}\n")
    (rundir / "passthrough").mkdir()


def test_a_dead_daemons_files_go(tmp_path):
    rundir = tmp_path / "run"
    _leftovers(rundir, _dead_pid())
    drop_daemon_leftovers(rundir)
    assert list(rundir.iterdir()) == []


def test_a_live_daemons_files_stay(tmp_path):
    rundir = tmp_path / "run"
    _leftovers(rundir, os.getpid())
    drop_daemon_leftovers(rundir)
    assert sorted(p.name for p in rundir.iterdir()) == ["control.sock", "passthrough", "pid"]


def test_a_socket_newer_than_the_dead_daemons_pid_file_is_anothers(tmp_path):
    """A new daemon makes its socket before its pid file: a socket younger
    than a dead daemon's pid file is the new one's."""
    rundir = tmp_path / "run"
    _leftovers(rundir, _dead_pid())
    time.sleep(0.01)
    (rundir / "control.sock").touch()
    (rundir / "passthrough" / "marker").write_bytes(b"")
    drop_daemon_leftovers(rundir)
    assert sorted(p.name for p in rundir.iterdir()) == ["control.sock", "passthrough"]


def test_a_pid_file_naming_another_process_stays(tmp_path):
    path = tmp_path / "supervisor.pid"
    path.write_text("12345\n")
    assert not drop_pid_file(path, 54321) and path.exists()
    assert drop_pid_file(path, 12345) and not path.exists()
    assert not drop_pid_file(path, 12345)  # gone already
