"""Who may send a request when: priorities, the in-flight byte budget, the
bandwidth cap of prefetch, and readahead windows of sequential readers.

Three classes of requests share the source's connections:

* READ: a program waits for the block. Always first: it takes any free
  slot, and while one waits, nothing of lower class starts.
* READAHEAD: ahead of a sequential reader (see `Readahead`); before
  prefetch, because a reader is known to want it soon.
* PREFETCH: background filling; at most `prefetch_max` requests at once.

Every wait here is on an event that the state change which could end it
sets: nothing polls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from .. import BLOCK_SIZE

READ, READAHEAD, PREFETCH = 0, 1, 2
# Blocks a read may start before where the previous one ended without
# breaking a sequential stream: the kernel sends readahead requests of 128 KiB
# (32 blocks) concurrently, so they can arrive slightly out of order.
SLACK = 64


class Changed:
    """A broadcast "something changed": `wait()` returns at the next
    `notify()` (an event replaced at each notification)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Slots:
    """Request slots and the in-flight byte budget.

    A job reserves the bytes it will fetch (`reserve`) before its first
    request and keeps them until they are stored (`release_bytes`): fetched
    bytes stay in memory until then. Reserving all at once, never piece by
    piece, is what keeps jobs from deadlocking, each holding part of the
    budget while waiting for more. A slot (`acquire`) is held only while a
    request is on the wire. The budget admits one job even when it alone is
    larger, so a big job can never wait forever."""

    def __init__(self, total: int, prefetch_max: int, budget: int):
        self.total, self.prefetch_max, self.budget = total, prefetch_max, budget
        self.busy = [0, 0, 0]  # slots in use, per class
        self.waiting = [0, 0, 0]  # slot or budget waiters, per class
        self.bytes = 0
        self.peak_bytes = 0
        self.changed = Changed()

    @property
    def busy_total(self) -> int:
        return sum(self.busy)

    def _before(self, level: int) -> bool:
        """Whether a higher class waits (then `level` must not go first)."""
        if level > READ and self.waiting[READ]:
            return True
        return level == PREFETCH and self.waiting[READAHEAD] > 0

    def _slot_free(self, level: int) -> bool:
        if self.busy_total >= self.total or self._before(level):
            return False
        return level < PREFETCH or self.busy[PREFETCH] < self.prefetch_max

    def _bytes_free(self, level: int, nbytes: int) -> bool:
        if self._before(level):
            return False
        return not self.bytes or self.bytes + nbytes <= self.budget

    async def _wait(self, level: int, free, urgent) -> int:
        """Wait until `free(level)`; a request a read starts waiting for
        (`urgent()` true) is promoted to READ. Whoever makes a request
        urgent calls `changed.notify()`."""
        self.waiting[level] += 1
        try:
            while not free(level):
                if level > READ and urgent is not None and urgent():
                    self.waiting[level] -= 1
                    level = READ
                    self.waiting[level] += 1
                    continue
                await self.changed.wait()
        finally:
            self.waiting[level] -= 1
        return level

    async def reserve(self, level: int, nbytes: int, urgent=None) -> int:
        """Reserve `nbytes` of the budget; returns the class it was taken at."""
        level = await self._wait(level, lambda lv: self._bytes_free(lv, nbytes), urgent)
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return level

    async def acquire(self, level: int, urgent=None) -> int:
        """Take a slot; returns the class it was taken at."""
        level = await self._wait(level, self._slot_free, urgent)
        self.busy[level] += 1
        return level

    def release_slot(self, level: int) -> None:
        self.busy[level] -= 1
        self.changed.notify()

    def release_bytes(self, nbytes: int) -> None:
        if nbytes:
            self.bytes -= nbytes
            self.changed.notify()


class TokenBucket:
    """Debt-style bucket: `charge(n)` counts bytes moved, `wait()` returns
    once the debt is repaid at `rate` B/s."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.burst = max(256 * 1024, self.rate * 0.25)

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def charge(self, nbytes: int) -> None:
        """Count bytes moved (may run into debt)."""
        self._refill()
        self.tokens -= nbytes

    @property
    def in_debt(self) -> bool:
        self._refill()
        return self.tokens < 0

    async def wait(self) -> None:
        """Return once the debt is repaid."""
        self._refill()
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


@dataclass
class Stream:
    """What is known of one file's reader."""

    next: int  # block after the last one read
    window: int  # readahead bytes
    start: int  # first block of the current sequential run
    frontier: int = 0  # first block no readahead covered yet
    sequential: bool = False


class Readahead:
    """Per-file sequential detection (fed by every read of the mount).

    A read that starts exactly where the previous one of the file ended makes
    the file's stream sequential (one that starts a little before it is a
    late or repeated read and changes nothing); then, whenever the reader comes within half a
    window of the readahead frontier, the next window is asked for and the
    window doubles (the reader kept up with the last one), up to `maximum`.
    Readahead starts only once the run is `after` bytes long: a program
    reading small clusters here and there is served by misses (each brings
    `amplify` bytes) and pays for no window it never reads. A read elsewhere
    resets the window to `start`. Like mountpoint-s3's
    prefetcher, but the window is bounded twice: by `maximum` and, with every
    other request, by the loader's in-flight byte budget."""

    def __init__(self, start: int, maximum: int, launch, after: int = 0):
        self.start, self.maximum = start, maximum
        self.after_blocks = after // BLOCK_SIZE
        self.launch = launch  # launch(ino, first_block, count)
        self.streams: dict[int, Stream] = {}

    def note_read(self, ino: int, first: int, last: int) -> None:
        """A program read blocks [first, last] of `ino` (called on the trio
        thread for every read: keep it cheap)."""
        s = self.streams.get(ino)
        if s is None:
            if len(self.streams) > 4096:
                self.streams.clear()  # forget idle readers, do not grow forever
            self.streams[ino] = Stream(next=last + 1, window=self.start, start=first)
            return
        if first == s.next:
            s.sequential = True
        elif not s.next - SLACK <= first < s.next:  # not a late or repeated read
            s.sequential, s.window, s.frontier = False, self.start, 0
            s.next, s.start = last + 1, first
        s.next = max(s.next, last + 1)
        if s.sequential and s.next - s.start >= self.after_blocks:
            self._ahead(ino, s)

    def _ahead(self, ino: int, s: Stream) -> None:
        if s.frontier < s.next:
            # first window, or the reader outran the last one: it wants more
            if s.frontier:
                s.window = min(self.maximum, s.window * 2)
            s.frontier = s.next
        elif s.frontier - s.next > max(1, s.window // BLOCK_SIZE) // 2:
            return  # far enough ahead
        else:
            s.window = min(self.maximum, s.window * 2)  # the reader kept up
        blocks = max(1, s.window // BLOCK_SIZE)
        first, s.frontier = s.frontier, s.frontier + blocks
        self.launch(ino, first, blocks)
