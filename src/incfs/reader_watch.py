"""Which processes wait on reads, and when one of them ends.

A read that waits for a block ends early when the process that asked for
it ends: nobody will take its answer, and its pending read should stop
asking loaders for a block no one needs (`Waits`). The kernel does not
say so itself for most of these reads. A page-cache readahead READ is
sent on a process's behalf, and a process killed while waiting for it
sends no FUSE_INTERRUPT.

Each waiting process is watched through a pidfd (Linux 5.3), which turns
readable once the process has exited: the waits of a process that ends
are cancelled at once, with no look every second at every waiting read.
One pidfd per process, shared by all its waiting reads, closed when its
last wait ends. The reader is the READ's thread group, not the thread
(a thread that asked and ended may leave others of its process waiting
for the same pages) and not whoever opened the file (it may have ended,
or forked and exited, with the descriptor still read by others). Where
pidfds are missing (or more than MAX_WATCHED processes wait at once), a
wait looks whether its process still runs, once a second.

A thread that ended before its READ is looked at cannot be traced to its
process, and counts as gone: the read ends with EINTR, and the kernel asks
again, as its own READ, for a page another thread of the process still
needs.
"""

from __future__ import annotations

import os

import trio

from .procs import process_alive

# How often a wait looks whether its reader still runs when the process
# cannot be watched (no pidfd): often enough that a dead reader's pending
# read goes within a second or two. Cheap for a few waiting reads, not for
# thousands (0.55 of a CPU at 5,000: bench/waiting_reads.py), hence pidfds.
LOOK_EVERY = 1.0
# Processes watched through pidfds at once. Each holds a descriptor, and
# the daemon needs its descriptors for images, plain copies and control
# clients: thousands of processes waiting at once (each blocked thread has
# a READ of its own) are looked at instead, past this many.
MAX_WATCHED = 256


class Watch:
    """One process's waiting reads (a state object: equal only to itself)."""

    def __init__(self, tgid: int, fd: int) -> None:
        self.tgid, self.fd = tgid, fd  # fd -1: not watched, looked at
        self.users = 0
        self.scopes: set[trio.CancelScope] = set()
        self.ended = tgid == 0  # no such process
        self.released = False  # its last wait ended and its pidfd is closed

    @property
    def watched(self) -> bool:
        return self.fd >= 0

    def gone(self) -> bool:
        """Whether the process has ended (asked, when it is not watched)."""
        if not self.ended and not self.watched:
            self.ended = not process_alive(self.tgid)
        return self.ended


class Readers:
    """The watched processes of one mount, by thread group id. Runs on the
    trio thread, like `Waits`."""

    def __init__(self) -> None:
        self._watches: dict[int, Watch] = {}

    def watch(self, pid: int) -> Watch:
        """The watch of the process thread `pid` belongs to, held until
        `release`. Its waits put their cancel scopes in `Watch.scopes`,
        which are cancelled when the process ends."""
        # a watched process's own pid names its leader thread (a number is
        # not reused while its process lives): no /proc read for the reads
        # of a main thread already watched
        w = self._watches.get(pid)
        if w is None:
            tgid = thread_group(pid)
            w = self._watches.get(tgid) if tgid else None
            if w is None:
                w = self._open(tgid)
        w.users += 1
        return w

    def release(self, w: Watch) -> None:
        w.users -= 1
        if w.users or not w.watched or w.ended:
            return
        self._forget(w)
        w.released = True
        trio.lowlevel.notify_closing(w.fd)  # the watching task returns
        os.close(w.fd)

    def _open(self, tgid: int) -> Watch:
        if not tgid:
            return Watch(0, -1)
        if len(self._watches) >= MAX_WATCHED:
            return Watch(tgid, -1)
        try:
            fd = os.pidfd_open(tgid)
        except ProcessLookupError:
            return Watch(0, -1)
        except (OSError, AttributeError):  # no pidfds (or descriptors): look instead
            return Watch(tgid, -1)
        w = self._watches[tgid] = Watch(tgid, fd)
        trio.lowlevel.spawn_system_task(self._wait_for_end, w, name="incfs reader watch")
        return w

    async def _wait_for_end(self, w: Watch) -> None:
        if w.released:  # released before this task ran: the number is not ours now
            return
        try:
            await trio.lowlevel.wait_readable(w.fd)
        except trio.ClosedResourceError:  # its last wait ended first
            return
        w.ended = True
        self._forget(w)  # a new process with this pid gets a watch of its own
        os.close(w.fd)
        for scope in w.scopes:
            scope.cancel()

    def _forget(self, w: Watch) -> None:
        if self._watches.get(w.tgid) is w:
            del self._watches[w.tgid]


def thread_group(pid: int) -> int:
    """The process (thread group) thread `pid` belongs to; 0 if it is gone.
    A FUSE request names the thread that sent it."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
