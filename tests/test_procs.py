"""incfs.procs: whether a process runs, and waiting for one to end (through
a pidfd, or by looking where there are none). Real processes."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time

import pytest

from incfs import procs


def _refuse_pidfds(monkeypatch) -> None:
    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "no pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", refuse)


@pytest.mark.parametrize("pidfds", [True, False])
def test_wait_gone(monkeypatch, pidfds):
    if not pidfds:
        _refuse_pidfds(monkeypatch)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert not procs.wait_gone(proc.pid, 0.1)  # still running: the time runs out
        killer = threading.Timer(0.2, proc.kill)
        killer.start()
        started = time.monotonic()
        assert procs.wait_gone(proc.pid, 30)  # woken by the end, not by the 30 s
        assert time.monotonic() - started < 20
        killer.join()
        assert not procs.process_alive(proc.pid)  # a zombie (not reaped yet) has ended
    finally:
        proc.kill()
        proc.wait()
    assert procs.wait_gone(proc.pid, 1)  # reaped: no such process
