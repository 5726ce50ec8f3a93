"""incfs.reader_watch: a waiting read's process watched through a pidfd
(real processes, real pidfds), and incfs.waits ending the reads of a
process that ends at once. The mounted case (a killed reader's pending read
goes; a read whose opener ended still waits) is in test_mount_extra.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time

import pytest
import trio

from incfs import reader_watch
from incfs.reader_watch import Readers, thread_group
from incfs.waits import ReaderGone, Waits


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def test_a_thread_belongs_to_its_process():
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(thread_group(threading.get_native_id())))
    t.start()
    t.join()
    assert threading.get_native_id() == os.getpid()
    assert seen == [os.getpid()]
    assert thread_group(0) == 0


def test_a_process_that_ends_cancels_its_waits_at_once():
    proc = _sleeper()

    async def main() -> float:
        readers = Readers()
        w = readers.watch(proc.pid)
        assert w.watched and not w.gone()
        assert readers.watch(proc.pid) is w  # one pidfd per process
        readers.release(w)
        fd = w.fd
        with trio.CancelScope() as scope:
            w.scopes.add(scope)
            proc.send_signal(signal.SIGKILL)
            started = trio.current_time()
            await trio.sleep(30)
        assert scope.cancelled_caught and w.gone()
        assert _closed(fd)
        assert readers.watch(proc.pid) is not w  # a reused pid is a new process
        return trio.current_time() - started

    try:
        assert trio.run(main) < 10  # woken by the pidfd, not by the 30 s sleep
    finally:
        proc.kill()
        proc.wait()


def test_the_last_wait_released_closes_the_pidfd():
    proc = _sleeper()

    async def main() -> None:
        readers = Readers()
        w = readers.watch(proc.pid)
        await trio.sleep(0.01)  # the watching task waits on the pidfd
        readers.release(w)
        assert _closed(w.fd) and not w.gone()
        await trio.sleep(0.01)  # and returns: trio.run ends with no task left

    try:
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()


def test_a_watch_released_before_its_task_runs():
    """A read whose block came at once releases its watch in the same step:
    the watching task, not started yet, must not wait on the closed number
    (an error in a system task would end the daemon; a reused number
    would be someone else's descriptor)."""
    proc = _sleeper()

    async def main() -> None:
        readers = Readers()
        w = readers.watch(proc.pid)
        readers.release(w)
        reused = os.open("/dev/null", os.O_RDONLY)  # likely the same number
        try:
            await trio.sleep(0.05)
        finally:
            os.close(reused)
        assert w.released and not w.gone()

    try:
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()


def test_a_process_already_gone_is_gone():
    proc = _sleeper()
    proc.kill()
    proc.wait()

    async def main() -> None:
        w = Readers().watch(proc.pid)
        assert w.gone() and not w.watched

    trio.run(main)


def test_without_pidfds_a_wait_looks(monkeypatch):
    """No pidfds (a kernel before 5.3): a wait asks whether its process runs."""
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "no pidfd_open")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    proc = _sleeper()

    async def main() -> None:
        w = Readers().watch(proc.pid)
        assert not w.watched and not w.gone()
        proc.kill()
        proc.wait()
        assert w.gone()

    try:
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()


def test_past_max_watched_a_wait_looks(monkeypatch):
    """More processes waiting than MAX_WATCHED: the rest are looked at, so
    the daemon keeps its descriptors for its own work."""
    monkeypatch.setattr(reader_watch, "MAX_WATCHED", 1)
    first, second = _sleeper(), _sleeper()

    async def main() -> None:
        readers = Readers()
        a, b = readers.watch(first.pid), readers.watch(second.pid)
        assert a.watched and not b.watched
        second.kill()
        second.wait()
        assert b.gone() and not a.gone()
        readers.release(a)
        readers.release(b)
        assert readers.watch(second.pid).gone()

    try:
        trio.run(main)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()


@pytest.mark.parametrize("reader", ["ends", "stays"])
def test_a_waiting_read_ends_with_its_reader(reader):
    """Waits.wait_all: the read of a process that ends raises ReaderGone
    at once and its pending read goes; a live reader's read waits for its
    block (the reads of pid 0, a reader not known, too)."""
    proc = _sleeper()
    key = (5, 0, 0)

    async def main() -> None:
        waits = Waits(read_timeout=None)
        async with trio.open_nursery() as nursery:
            outcome: list[str] = []

            async def read(pid: int) -> None:
                try:
                    await waits.wait_all([key], pid)
                    outcome.append("filled")
                except ReaderGone:
                    outcome.append("gone")

            nursery.start_soon(read, proc.pid)
            nursery.start_soon(read, 0)
            await trio.sleep(0.05)
            assert key in waits.pending
            if reader == "ends":
                started = time.monotonic()
                proc.kill()
                with trio.fail_after(10):
                    while not outcome:
                        await trio.sleep(0.01)
                assert outcome == ["gone"] and time.monotonic() - started < 10
                assert waits.counters["reads_abandoned"] == 1
                assert key in waits.pending  # the other read still waits
            waits.filled(key)
        assert outcome == (["gone", "filled"] if reader == "ends" else ["filled", "filled"])
        assert key not in waits.pending

    try:
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()
