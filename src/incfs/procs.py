"""Processes by pid: whether one still runs, and whether it is ours.

Small and without trio, so the supervisor and the runtime directory's
cleanup (incfs.rundir) can ask without loading the event loop; pid files
outlive their processes, and pids are reused."""

from __future__ import annotations

import os
import select
import time


def runs_module(pid: int, module: bytes = b"incfs") -> bool:
    """Whether process `pid` runs incfs (`module`, e.g. b"incfs.mount", in its
    command line): pids are reused, and a stale pid file must never make us
    signal somebody else's process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return module in f.read()
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return os.path.exists(f"/proc/{pid}") and _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    """Wait up to `seconds` for process `pid` to end; True once it has.
    Through a pidfd, readable once the process exits: it wakes at that
    moment, not at the next of many looks, and a pid reused meanwhile
    cannot keep it waiting. Without pidfds (Linux before 5.3) it looks
    every 20 ms."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (OSError, AttributeError):
        return _look_until_gone(pid, seconds)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, seconds) * 1000))
    finally:
        os.close(fd)


def _look_until_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
