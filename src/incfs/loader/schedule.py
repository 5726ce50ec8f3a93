"""Who may send a request when: priorities, the in-flight byte budget, the
bandwidth cap of prefetch, and readahead windows of sequential readers.

Three classes of requests share the source's connections:

* READ: a program waits for the block. Always first: it takes any free
  slot, and while one waits, nothing of lower class starts.
* READAHEAD: ahead of a sequential reader (see `Readahead`); before
  prefetch, because a reader is known to want it soon.
* PREFETCH: background filling; at most `prefetch_max` requests at once.

Readahead and prefetch together keep at most the pipeline depth (`depth()`,
bandwidth x RTT measured by link.LinkEstimate) of bytes on the wire (asked
for and not in yet: a request's bytes leave the count as its answer comes
in, `landed`): more would only queue in the network; reads are never held
back by it.

Every wait here is on an event that the state change which could end it
sets: nothing polls.
"""

from __future__ import annotations

import bisect
import time
from array import array
from collections.abc import Callable

import trio

from .. import BLOCK_SIZE

READ, READAHEAD, PREFETCH = 0, 1, 2
# Blocks a read may start before where the previous one ended without
# breaking a sequential stream (at least; or four reads of its own length):
# the kernel sends readahead requests concurrently, so they can arrive
# slightly out of order.
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
    request is on the wire, and jobs holding budget wait only for slots, so
    the budget always comes back. The budget admits one job even when it alone is
    larger, so a big job can never wait forever."""

    def __init__(self, total: int, prefetch_max: int, budget: int,
                 depth: Callable[[], int] | None = None):
        self.total, self.prefetch_max, self.budget = total, prefetch_max, budget
        self.depth = depth  # bytes readahead and prefetch may have on the wire
        self.busy = [0, 0, 0]  # slots in use, per class
        self.wire = [0, 0, 0]  # bytes asked for by requests on the wire, per class
        # waiters per class, for slots and for budget apart: a read waiting
        # for budget must not keep the jobs that hold it from their slots
        # (they could never finish and give it back)
        self.waiting_slot = [0, 0, 0]
        self.waiting_bytes = [0, 0, 0]
        # per class, the source offsets of jobs launched that have not got
        # their first slot yet, sorted: the nearest goes first (`enqueue`)
        self._queued: list[list[int]] = [[], [], []]
        self.bytes = 0
        self.peak_bytes = 0
        self.changed = Changed()

    @property
    def busy_total(self) -> int:
        return sum(self.busy)

    @property
    def waiting(self) -> list[int]:
        """Waiters per class, for either resource."""
        return [a + b for a, b in zip(self.waiting_slot, self.waiting_bytes)]

    @staticmethod
    def _before(waiting: list[int], level: int) -> bool:
        """Whether a higher class waits (then `level` must not go first)."""
        if level > READ and waiting[READ]:
            return True
        return level == PREFETCH and waiting[READAHEAD] > 0

    def _slot_free(self, level: int, nbytes: int = 0, order: int | None = None) -> bool:
        if self.busy_total >= self.total or self._before(self.waiting_slot, level):
            return False
        queued = self._queued[level]
        if order is not None and level > READ and queued and queued[0] < order:
            return False  # one nearer the reader waits: it goes first
        if level > READ and self.depth is not None:
            background = self.wire[READAHEAD] + self.wire[PREFETCH]
            if background and background + nbytes > self.depth():
                return False
        return level < PREFETCH or self.busy[PREFETCH] < self.prefetch_max

    def _bytes_free(self, level: int, nbytes: int) -> bool:
        if self._before(self.waiting_bytes, level):
            return False
        return not self.bytes or self.bytes + nbytes <= self.budget

    async def _wait(self, waiting: list[int], level: int, free, urgent) -> int:
        """Wait until `free(level)`; a request a read starts waiting for
        (`urgent()` true) is promoted to READ. Whoever makes a request
        urgent calls `changed.notify()`."""
        waiting[level] += 1
        try:
            while not free(level):
                if level > READ and urgent is not None and urgent():
                    waiting[level] -= 1
                    level = READ
                    waiting[level] += 1
                    continue
                await self.changed.wait()
        finally:
            waiting[level] -= 1
        return level

    def enqueue(self, level: int, order: int) -> None:
        """A job of class `level` whose first request is at source offset
        `order` was launched: until it `dequeue`s, requests of its class
        at a greater offset wait for it (see `acquire`). Taken at launch,
        not when the job first asks for a slot: a window's jobs start
        together, and trio runs new tasks in no set order."""
        bisect.insort(self._queued[level], order)

    def dequeue(self, level: int, order: int) -> None:
        """The job `enqueue`d at `order` got its first slot, or ended."""
        queued = self._queued[level]
        k = bisect.bisect_left(queued, order)
        if k < len(queued) and queued[k] == order:
            del queued[k]
            self.changed.notify()  # the next in the queue may go now

    def drained(self, level: int, nbytes: int) -> bool:
        """Whether requests of class `level` have less than `nbytes` asked
        for and not in, and none is waiting to start."""
        return (self.wire[level] < nbytes and not self.waiting_slot[level]
                and not self._queued[level])

    def can_reserve(self, level: int, nbytes: int) -> bool:
        """Whether `reserve` would take `nbytes` now, without waiting."""
        return self._bytes_free(level, nbytes)

    async def reserve(self, level: int, nbytes: int, urgent=None) -> int:
        """Reserve `nbytes` of the budget; returns the class it was taken at."""
        level = await self._wait(self.waiting_bytes, level,
                                 lambda lv: self._bytes_free(lv, nbytes), urgent)
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return level

    async def acquire(self, level: int, urgent=None, nbytes: int = 0,
                      order: int | None = None) -> int:
        """Take a slot for a request of `nbytes`; returns the class it was
        taken at (give both back to `release_slot`). A readahead or
        prefetch request of a job `enqueue`d at `order` waits while a job of
        its class nearer the reader (a smaller offset) has not got its first
        slot: a window's jobs then start in source order. In the order trio
        happened to run them, the reader waited for a piece asked for last
        while the rest of the window arrived, and the next window was asked
        for only once the link had drained (a round trip idle a window)."""
        level = await self._wait(self.waiting_slot, level,
                                 lambda lv: self._slot_free(lv, nbytes, order), urgent)
        self.busy[level] += 1
        self.wire[level] += nbytes
        return level

    def landed(self, level: int, nbytes: int) -> None:
        """`nbytes` more of the answer to a request of class `level` are in
        (negative: a retry started its body again). They are off the wire:
        the depth counts what is asked for and not here yet. Counting each
        request whole until its last byte, two 1 MiB requests that shared
        the link ended together, and the link sat idle for the round trip
        of the next (~1 % of a 100 ms / 10 Mbit/s link)."""
        if not nbytes:
            return
        self.wire[level] -= nbytes
        if nbytes > 0 and level > READ and (self.waiting_slot[READAHEAD]
                                            or self.waiting_slot[PREFETCH]):
            self.changed.notify()

    def release_slot(self, level: int, nbytes: int = 0) -> None:
        self.busy[level] -= 1
        self.wire[level] -= nbytes
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


class Stream:
    """What is known of one file's reader."""

    def __init__(self, next: int, window: int, start: int, longest: int = 0) -> None:  # noqa: A002
        self.next = next  # block after the last one read
        self.window = window  # readahead bytes
        self.start = start  # first block of the current sequential run
        self.frontier = 0  # first block no readahead covered yet
        self.sequential = False
        self.longest = longest  # blocks of its longest read


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
    other request, by the loader's in-flight byte budget. A program reading
    whole files one after another in source order gets one window over the
    source instead (`_walk_to`), which runs on from file to file."""

    def __init__(self, start: int, maximum: int, launch, after: int = 0,
                 cap: Callable[[], int] | None = None, align: int = 1,
                 drained: Callable[[int], bool] | None = None):
        self.start, self._maximum = start, maximum
        # windows of at least `align` blocks end on a multiple of it: the
        # loader's jobs then fetch leaf groups whole and build their hashes
        self.align = align
        self.cap = cap  # the window the link needs (see Loader: 2 x depth)
        self.after_blocks = after // BLOCK_SIZE
        self.launch = launch  # launch(ino, first_block, count)
        self.streams: dict[int, Stream] = {}
        self.order: SourceOrder | None = None  # set once known: readahead across files
        self.last_ino: int | None = None
        # a walk: files read whole, one after another in source order; its
        # readahead runs over the source, not file by file (see _walk_to)
        self.walk_ino: int | None = None  # the file the walk is in
        self.cross_window = start
        self.cross_front: int | None = None  # source offset no walk readahead covered
        self.walk_windows = 0  # windows asked for by walks (status)
        # drained(n): whether less than n bytes of readahead are asked for
        # and not in (see `landed`); the walk's reader was last at `_walk_at`
        self.drained = drained
        self._walk_at: int | None = None
        self.held_windows = 0  # windows asked for while a walk's reader was held up (status)

    @property
    def maximum(self) -> int:
        """Largest window: `maximum`, or less when the link needs less (a
        window past what keeps the pipe full only costs wasted bytes when the
        reader stops)."""
        if self.cap is None:
            return self._maximum
        return max(self.start, min(self._maximum, self.cap()))

    def note_read(self, ino: int, first: int, last: int) -> None:
        """A program read blocks [first, last] of `ino` (called on the trio
        thread for every read: keep it cheap)."""
        if first == 0 and self.order is not None and ino != self.last_ino:
            self._walk_to(ino)
        self.last_ino = ino
        walking = ino == self.walk_ino
        if not self._follow(ino, first, last, ahead=not walking) and walking:
            # a jump: the program does not read the files whole after all;
            # the file gets a window of its own from its next reads on
            self._end_walk()
        elif walking:
            self._walk_ahead(ino, last)

    def note_passthrough(self, ino: int) -> None:
        """File `ino` was opened in passthrough mode: the kernel reads it
        from the backing file, and none of its reads come here. For a walk
        it counts as read whole, so the walk goes on past it (a walk whose
        reader seemed to skip a file would end, and start small again)."""
        if self.order is not None and (blocks := self.order.blocks_of(ino)) > 0:
            self.note_read(ino, 0, blocks - 1)

    def _follow(self, ino: int, first: int, last: int, ahead: bool) -> bool:
        """Track the file's reader, and with `ahead` keep its window ahead
        of it; False when the read jumped elsewhere in the file."""
        s = self.streams.get(ino)
        if s is None:
            if len(self.streams) > 4096:
                self.streams.clear()  # forget idle readers, do not grow forever
            s = self.streams[ino] = Stream(next=last + 1, window=self.start, start=first,
                                           longest=last - first + 1)
            if first == 0 and last + 1 >= self.after_blocks:
                # read from its start in one read as long as `after`: a
                # program reading the file whole (cat, cp, loading a model);
                # start the window now, not a round trip later
                s.sequential = True
                s.window = max(self.start, min(self.maximum, (last + 1) * BLOCK_SIZE))
                if ahead:
                    self._ahead(ino, s)
            return True
        # the kernel sends a file's readahead reads (1 MiB each while
        # loading) several at once, and they can arrive a few reads out of
        # order: one a little behind is late, one a read ahead is early
        length = last - first + 1
        slack = max(SLACK, 4 * length)
        jumped = False
        if s.next <= first <= s.next + length:
            s.sequential = True
        elif not s.next - slack <= first < s.next:  # a jump
            s.sequential, s.window, s.frontier = False, self.start, 0
            s.next, s.start = last + 1, first
            jumped = True
        s.next = max(s.next, last + 1)
        s.longest = max(s.longest, length)
        if ahead and s.sequential and s.next - s.start >= self.after_blocks:
            self._ahead(ino, s)
        return not jumped

    def _grown(self, front: int | None, at: int, window: int, half: int):
        """(front, window) of a stream's next window, its reader at `at`
        and its readahead covering up to `front` (None: nothing yet); None
        while it is more than `half` ahead. The window doubles when the
        reader outran the last one or kept up with it, up to `maximum`."""
        if front is None or front < at:
            # first window, or the reader outran the last one: it wants more
            return at, window if front is None else min(self.maximum, window * 2)
        if front - at > half:
            return None  # far enough ahead
        return front, min(self.maximum, window * 2)  # the reader kept up

    def _ahead(self, ino: int, s: Stream) -> None:
        grown = self._grown(s.frontier or None, s.next, s.window,
                            max(1, s.window // BLOCK_SIZE) // 2)
        if grown is None:
            return
        s.frontier, s.window = grown
        blocks = max(1, s.window // BLOCK_SIZE)
        if blocks >= self.align:
            blocks += -(s.frontier + blocks) % self.align
        first, s.frontier = s.frontier, s.frontier + blocks
        self.launch(ino, first, blocks)

    def _walk_to(self, ino: int) -> None:
        """A file's first block is read: if the whole file before it in the
        source was just read, a program walks the tree in pack order (cp -r,
        tar, loading every file of a model). Its readahead then runs on over
        the source as one stream (`_walk_ahead`) instead of starting afresh
        in each file: a window that begins at each file's first read leaves
        the link idle for a round trip at every file (30-40 ms a file at
        20 ms RTT, against rclone's 10), and one that restarts small gets
        outrun where it ends."""
        order, prev = self.order, self.last_ino
        done = prev is not None and prev in self.streams and \
            self.streams[prev].next >= order.blocks_of(prev)
        if not done or not order.follows(prev, ino):
            self._end_walk()
            return
        if self.walk_ino is None:
            # a walk begins, as fast as its first file was read, and at
            # least as wide as that file's longest read: the kernel reads
            # the next file in reads as long, and one that finds part of
            # it neither here nor on its way is refused (Service._spares)
            s = self.streams[prev]
            self.cross_window = max(self.start, min(self.maximum,
                                                    max(s.window, s.longest * BLOCK_SIZE)))
        self.walk_ino = ino

    def _end_walk(self) -> None:
        self.walk_ino, self.cross_window, self.cross_front = None, self.start, None
        self._walk_at = None

    def landed(self) -> None:
        """A readahead job ended. A walk's next window is asked for when its
        reader comes within half a window of the front (`_walk_ahead`); a
        reader held up by one slow request (a TCP flow in loss recovery:
        1 MiB took 4.9 s where the rest of its window took 1) reads
        nothing meanwhile, and the link drained while the window's other
        requests ended. So when a job ends and less than half a window is
        left on the wire, the next window is asked for now, up to two
        windows ahead of the reader (what a stopped reader can leave
        fetched for nothing)."""
        if self.walk_ino is None or self.cross_front is None or self._walk_at is None:
            return
        if self.drained is None or self.cross_front - self._walk_at >= 2 * self.cross_window:
            return
        if not self.drained(self.cross_window // 2):
            return
        pieces, self.cross_front = self.order.window(self.cross_front, self.cross_window,
                                                     self.align)
        self.walk_windows += 1
        self.held_windows += 1
        for run_ino, first, count in pieces:
            self.launch(run_ino, first, count)

    def _walk_ahead(self, ino: int, last: int) -> None:
        """The walk's reader is at block `last` of `ino`: keep the source
        ahead of it fetched, a window at a time; the window doubles while
        the reader keeps up, as a file's does (`_ahead`)."""
        at = self.order.offset_of(ino, last)
        if at is None:
            return
        self._walk_at = at + BLOCK_SIZE
        grown = self._grown(self.cross_front, at + BLOCK_SIZE, self.cross_window,
                            self.cross_window // 2)
        if grown is None:
            return
        front, self.cross_window = grown
        pieces, self.cross_front = self.order.window(front, self.cross_window, self.align)
        self.walk_windows += 1
        for run_ino, first, count in pieces:
            self.launch(run_ino, first, count)


class SourceOrder:
    """Where files' data lie in the source, in source order: which file
    follows which, and the blocks of a stretch of the source.

    Kept in four flat arrays (32 bytes per run of blocks: a million files
    cost 32 MiB, not the ~200 of tuples and dicts); per-file facts come from
    the image's source maps through `offset_of(ino, index)` (None when the
    block has no bytes in the source) and `blocks_of(ino)`."""

    def __init__(self, runs, offset_of, blocks_of) -> None:
        """`runs`: (offset, ino, tree, first, count) from prefetch.source_runs."""
        self.offsets, self.inos = array("q"), array("q")
        self.firsts, self.counts = array("q"), array("q")
        for off, ino, tree, first, count in runs:
            if tree == 0 and count:
                self.offsets.append(off)
                self.inos.append(ino)
                self.firsts.append(first)
                self.counts.append(count)
        self.offset_of, self.blocks_of = offset_of, blocks_of

    def _run_at(self, ino: int, index: int) -> int | None:
        """Index of the run holding block `index` of `ino`."""
        offset = self.offset_of(ino, index)
        if offset is None:
            return None
        k = bisect.bisect_right(self.offsets, offset) - 1
        while k >= 0 and self.offsets[k] == offset and self.inos[k] != ino:
            k -= 1  # runs of other files at the same offset (shared blocks)
        if k < 0 or self.inos[k] != ino:
            return None
        return k

    def follows(self, prev: int, ino: int) -> bool:
        """Whether file `ino` starts where file `prev` ends in the source."""
        last = self.blocks_of(prev) - 1
        a = self._run_at(prev, last) if last >= 0 else None
        b = self._run_at(ino, 0)
        return a is not None and b == a + 1

    def window(self, offset: int, nbytes: int, align: int = 1):
        """(pieces, end): the blocks of [offset, offset + nbytes) of the
        source as `runs_from` gives them, the last piece carried on to a
        multiple of `align` blocks of its file (or the file's end: jobs then
        hold whole leaf groups), and the source offset just past them."""
        pieces = list(self.runs_from(offset, nbytes))
        if not pieces:
            return [], offset + nbytes
        ino, first, count = pieces[-1]
        if nbytes // BLOCK_SIZE >= align:
            count = min(count + -(first + count) % align, self.blocks_of(ino) - first)
            pieces[-1] = (ino, first, count)
        end = self.offset_of(ino, first + count - 1)
        if end is None or end + BLOCK_SIZE <= offset:
            return pieces, offset + nbytes
        return pieces, end + BLOCK_SIZE

    def runs_from(self, offset: int, nbytes: int):
        """(ino, first, count) of the blocks in [offset, offset + nbytes) of
        the source (a run that begins before `offset` is entered midway)."""
        k = max(0, bisect.bisect_right(self.offsets, offset) - 1)
        end = offset + nbytes
        while k < len(self.offsets) and self.offsets[k] < end:
            off, ino, first, count = (self.offsets[k], self.inos[k], self.firsts[k],
                                      self.counts[k])
            k += 1
            skip = max(0, (offset - off) // BLOCK_SIZE)
            if skip >= count:
                continue
            take = min(count - skip, max(1, -(-(end - max(off, offset)) // BLOCK_SIZE)))
            yield ino, first + skip, take
