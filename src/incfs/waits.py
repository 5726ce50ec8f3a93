"""Pending reads: who waits for which block, serial numbers, wake-ups, timeouts,
and the read log.

One `PendingRead` per absent block, however many readers wait for it; a
loader sees it once (by serial) and a fill wakes every reader at once. All of
this runs on the trio thread of the daemon, so no locks are needed.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable

import trio

from .reader_watch import LOOK_EVERY, Readers, Watch


BlockKey = tuple[int, int, int]  # (ino, tree, index)
READ_LOG_SIZE = 65536
LATENCY_SAMPLES = 4096
# Upper bounds (seconds) of the miss-latency histogram's buckets: fixed, so a
# monitoring system can add histograms of several mounts and over time; from
# a block filled locally (~1 ms) to a slow source (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def nothing_fetched(key: BlockKey) -> bool:
    """`Waits.fetching` without a loader."""
    return False


class PendingRead:
    """A block some read waits for (a state object: equal only to itself)."""

    def __init__(self, serial: int, ino: int, tree: int, index: int, time_ns: int) -> None:
        self.serial, self.ino, self.tree, self.index, self.time_ns = (
            serial, ino, tree, index, time_ns)
        self.done = trio.Event()
        self.waiters = 0
        self.error: BaseException | None = None  # set by `Waits.fail`: raised in every waiter

    def as_dict(self) -> dict:
        return {"serial": self.serial, "ino": self.ino, "tree": int(self.tree),
                "block": self.index, "time_ns": self.time_ns}


class Histogram:
    """Counts of observations per fixed bucket, plus their sum: what a
    Prometheus histogram exports. Unlike `Waits.latencies` (the last 4096,
    for percentiles) it covers the whole life of the mount in constant space."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append((bound, running))
        return out

    def as_dict(self) -> dict:
        # JSON has no infinity: "+Inf" as Prometheus writes it
        buckets = [["+Inf" if math.isinf(b) else b, n] for b, n in self.cumulative()]
        return {"buckets": buckets, "sum": round(self.sum, 6), "count": self.count}


class ReadTimedOut(Exception):
    """A read waited longer than its bound; `key` is the block it waited for."""

    def __init__(self, key: BlockKey | None = None):
        super().__init__("read timed out")
        self.key = key


class ReaderGone(Exception):
    """The process whose read waited ended (reader_watch.py)."""


class Waits:
    def __init__(self, read_timeout: float | None):
        self.read_timeout = read_timeout  # None waits forever
        # per-uid bounds set over the control protocol (None: forever); a uid
        # not listed gets `read_timeout`
        self.uid_timeouts: dict[int, float | None] = {}
        self.pending: dict[BlockKey, PendingRead] = {}
        self.serial = 0
        self._new_pending = trio.Event()
        self.read_log: deque[tuple[int, int, int, int]] = deque(maxlen=READ_LOG_SIZE)
        self.log_serial = 0
        # called with (ino, first block, last block) for every read, on the
        # trio thread: lets a loader see readers that do not miss (readahead)
        self.read_hooks: list[Callable[[int, int, int], None]] = []
        # called with (ino, first block, count) when a read whose first block
        # is here is refused so that the kernel asks again page by page
        # (Service.read, spare_tail): a loader fetches the rest now, so the
        # page reads that follow find it on its way instead of each missing
        self.spared_hooks: list[Callable[[int, int, int], None]] = []
        # called with the inode of a file opened in passthrough mode, whose
        # reads the kernel serves from then on without asking us
        self.passthrough_hooks: list[Callable[[int], None]] = []
        # whether a loader is fetching a block now (the loader sets it): a
        # read whose absent tail is all on its way waits for it instead of
        # being refused (Service._read)
        self.fetching: Callable[[BlockKey], bool] = nothing_fetched
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.latency_histogram = Histogram()
        self.counters = {"timeouts": 0, "misses": 0, "reads_abandoned": 0, "failed": 0}
        self.readers = Readers()

    # --- readers ---------------------------------------------------------------

    def request(self, key: BlockKey) -> PendingRead:
        """The pending read for a block, created (and announced) if new."""
        pr = self.pending.get(key)
        if pr is None:
            self.serial += 1
            pr = PendingRead(self.serial, key[0], key[1], key[2], time.time_ns())
            self.pending[key] = pr
            self._new_pending.set()
            self._new_pending = trio.Event()
            self.counters["misses"] += 1
        return pr

    def timeout_for(self, uid: int | None) -> float | None:
        """The read bound of a reader's uid: its own if set, else the mount's."""
        if uid is not None and uid in self.uid_timeouts:
            return self.uid_timeouts[uid]
        return self.read_timeout

    async def wait_all(self, keys: list[BlockKey], reader_pid: int = 0,
                       uid: int | None = None) -> None:
        """Wait until every block in `keys` is filled, the reader's timeout
        passes (ReadTimedOut) or the reading process ends (ReaderGone).
        `reader_pid` is the thread the read came from (0: not known, then
        only the timeout ends the wait)."""
        started = time.monotonic()
        waits = [self.request(k) for k in keys]
        for pr in waits:
            pr.waiters += 1
        reader = None
        try:
            if reader_pid > 0:
                reader = self.readers.watch(reader_pid)
            bound = self.timeout_for(uid)
            deadline = math.inf if bound is None else started + bound
            for pr in waits:
                await self._wait_one(pr, deadline, reader)
        finally:
            if reader is not None:
                self.readers.release(reader)
            for pr in waits:
                pr.waiters -= 1
                self._drop_if_abandoned(pr)
        elapsed = time.monotonic() - started
        self.latencies.append(elapsed)
        self.latency_histogram.observe(elapsed)

    async def _wait_one(self, pr: PendingRead, deadline: float, reader: Watch | None) -> None:
        while not pr.done.is_set():
            if reader is not None and reader.gone():
                self.counters["reads_abandoned"] += 1
                raise ReaderGone()
            left = deadline - time.monotonic()
            if left <= 0:
                self.counters["timeouts"] += 1
                raise ReadTimedOut((pr.ino, pr.tree, pr.index))
            # a watched reader's end cancels the scope; one that is not
            # watched is looked at every LOOK_EVERY seconds
            looked = reader is not None and not reader.watched
            with trio.move_on_after(min(left, LOOK_EVERY) if looked else left) as scope:
                if reader is not None:
                    reader.scopes.add(scope)
                try:
                    await pr.done.wait()
                finally:
                    if reader is not None:
                        reader.scopes.discard(scope)
        if pr.error is not None:
            raise pr.error

    def _drop_if_abandoned(self, pr: PendingRead) -> None:
        """Nobody waits any more (timed out or died): forget the pending read
        so loaders are not asked for a block no one needs now."""
        key = (pr.ino, pr.tree, pr.index)
        if pr.waiters == 0 and not pr.done.is_set() and self.pending.get(key) is pr:
            del self.pending[key]

    def spared(self, ino: int, first: int, count: int) -> None:
        for hook in self.spared_hooks:
            hook(ino, first, count)

    def passed_through(self, ino: int) -> None:
        for hook in self.passthrough_hooks:
            hook(ino)

    def log_read(self, ino: int, first: int, last: int) -> None:
        for hook in self.read_hooks:  # e.g. the loader's readahead
            hook(ino, first, last)
        now = time.time_ns()
        for index in range(first, last + 1):
            self.log_serial += 1
            self.read_log.append((self.log_serial, ino, index, now))

    # --- loaders ---------------------------------------------------------------

    def filled(self, key: BlockKey) -> None:
        pr = self.pending.pop(key, None)
        if pr is not None:
            pr.done.set()

    def fail(self, key: BlockKey, error: BaseException) -> bool:
        """A loader gave up on a block (it failed verification from every
        source, or the source refuses it): wake its waiters with `error`
        instead of letting them wait forever. A later read asks again.
        Returns whether anyone was waiting."""
        pr = self.pending.pop(key, None)
        if pr is None:
            return False
        pr.error = error
        pr.done.set()
        self.counters["failed"] += 1
        return True

    async def next_pending(self, timeout: float, after_serial: int = 0,
                           limit: int = 1024) -> list[PendingRead]:
        """Pending reads with a serial above `after_serial`, waiting up to
        `timeout` seconds for one to appear."""
        with trio.move_on_after(max(0.0, timeout)):
            while True:
                found = self.newer_than(after_serial, limit)
                if found:
                    return found
                await self._new_pending.wait()
        return self.newer_than(after_serial, limit)

    def newer_than(self, after_serial: int, limit: int = 1024) -> list[PendingRead]:
        found = [pr for pr in self.pending.values() if pr.serial > after_serial]
        found.sort(key=lambda pr: pr.serial)
        return found[:limit]

    def latency_percentiles(self) -> dict:
        """p50/p99 of the recent misses and the histogram of all of them
        (status' `miss_latency`: the histogram rides along so that status,
        its JSON file and the metrics exporter all see it)."""
        histogram = self.latency_histogram.as_dict()
        if not self.latencies:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "histogram": histogram}
        ordered = sorted(self.latencies)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
        return {"p50_ms": round(pick(0.50), 3), "p99_ms": round(pick(0.99), 3),
                "histogram": histogram}
