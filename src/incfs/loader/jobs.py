"""Running one fetch job of the loader: fetching its ranges (timed, for the
link estimate), checking what came back, storing it through `Service.fill`
and fetching again what failed its check, once, from another mirror when
there is one. A mixin of `Loader` (core.py), which owns the jobs' planning,
the slots and the status.
"""

from __future__ import annotations

import errno
import logging
import random
import time

import trio

from ..errors import CorruptImage, IntegrityError
from ..format.records import TreeKind
from ..image import FillBlock
from ..sources import MirroredSource, ObjectChangedError, SourceError, TransientSourceError
from .arrivals import Arrivals, Arrived
from .plan import DATA, HASH, Job, Range, Want, parents_needed, plan_ranges
from .schedule import PREFETCH, READ, READAHEAD

log = logging.getLogger("incfs.loader")


class FetchFailed(IntegrityError):
    """A block could not be fetched intact (it failed verification from
    every source tried, or the source refused it): the reads waiting for it
    fail with EIO."""

    errno = errno.EIO


class JobRunner:
    """Mixed into Loader, which provides cfg, service, image, source, demand,
    slots, inflight, link, readahead and the planning and status methods
    these call."""

    @property
    def reading_from(self):
        """What reads go to: the loader's source, or, until its client is
        imported, the early connections (Loader._choose_source). Both read,
        stream, name themselves and count."""
        return self.source if self.source is not None else self.demand

    async def _run_job(self, job: Job) -> None:
        delay = 0.2
        try:
            while not self.stopped:
                try:
                    await self._attempt(job)
                    return
                except ObjectChangedError as e:
                    self._note_error(e)
                    self._source_changed(str(e))
                    return
                except TransientSourceError as e:
                    self._note_error(e)
                    if not self._wanted(job):
                        # nobody waits: prefetch comes back to these blocks later
                        self._pause_prefetch(job, self.prefetch_backoff)
                        self.prefetch_backoff = min(self.prefetch_backoff * 2, 30.0)
                        return
                    job.prefetch = False  # a read waits for it now
                    self.stats["retries"] += 1
                    await trio.sleep(random.uniform(delay / 2, delay))
                    delay = min(delay * 2, self.cfg.retry_cap)
                except SourceError as e:  # permanent: retrying the same request cannot help
                    self._note_error(e)
                    self._give_up(job, f"cannot fetch from the source: {e}")
                    return
                except Exception as e:  # e.g. the cache's disk is full: fail, keep going
                    log.exception("storing fetched blocks of inode %d failed", job.ino)
                    self.stats["errors"] += 1
                    self.last_error = f"cannot store fetched blocks: {e}"
                    self._give_up(job, f"cannot store fetched blocks: {e}")
                    return
        finally:
            self._dequeue(job)
            self._yield_after(job)
            if self.stopped:
                self._fail_stopped_job(job)
            self._release(job, list(job.keys))
            if job.readahead and not self.stopped and not self._scope.cancel_called:
                self.readahead.landed()
            self._update_status()
            if job.background:
                self.prefetch_running -= 1
                self._widen_prefetch(job)
                self.slots.changed.notify()

    def _queue_job(self, job: Job, level: int) -> None:
        """Give a job launched with others its place in its class's queue,
        by its first byte in the source (Slots.enqueue)."""
        offsets = [w.offset for w in job.wants if w.size and not w.derived]
        if offsets:
            job.queued = (level, min(offsets))
            self.slots.enqueue(*job.queued)

    def _dequeue(self, job: Job) -> None:
        if job.queued is not None:
            self.slots.dequeue(*job.queued)
            job.queued = None

    def _widen_prefetch(self, job: Job) -> None:
        """A prefetch job ended: twice as many may run at once if no read missed
        far from prefetch while it ran (see Loader.prefetch_width)."""
        if self.stats["prefetch_yields"] == job.far_mark:
            self.prefetch_width = min(self.cfg.prefetch_slots, self.prefetch_width * 2)

    def _pause_prefetch(self, job: Job, seconds: float) -> None:
        if job.background:
            self.prefetch_pause_until = time.monotonic() + seconds

    def _give_up(self, job: Job, why: str) -> None:
        self._fail_waiters(job, list(job.keys), FetchFailed(why))
        self._pause_prefetch(job, 30.0)

    def _fail_stopped_job(self, job: Job) -> None:
        error = FetchFailed(self.info.get("offline") or "source changed")
        for key in job.keys:
            self.waits.fail(key, error)

    async def _attempt(self, job: Job) -> None:
        """One try at a job, with its bytes reserved in the budget."""
        nbytes = job.nbytes  # more than the budget: admitted alone
        if not self.slots.can_reserve(self._level(job), nbytes):
            # its place in the queue would hold back jobs whose budget only
            # comes back once they are fetched
            self._dequeue(job)
        await self.slots.reserve(self._level(job), nbytes, urgent=lambda: self._wanted(job))
        job.held = nbytes
        try:
            await self._attempt_once(job)
        finally:
            self.slots.release_bytes(job.held)
            job.held = 0

    async def _attempt_once(self, job: Job) -> None:
        node = self.image.ns.inodes[job.ino]
        wants = [w for w in job.wants if (job.ino, w.tree, w.index) in job.keys
                 and not self._present(node, w.tree, w.index)]
        await self._base_indexed()
        if self.base is not None:
            for w in wants:
                w.derived = False  # reuse needs the leaves' hashes before the data
            wants = await self._hash_first(node, job, wants)
            # hash blocks another job is fetching (a window's hash job started
            # before the base was indexed) tell which data the base has too
            await self._wait_for_parents(node, DATA, [w.index for w in wants if w.tree == DATA],
                                         set(), job)
            wants = await self._reuse(node, job, wants)
        if not wants:
            return
        ranges = plan_ranges(wants, self._max_len(job), self.cfg.max_gap)
        arrivals = Arrivals(ranges, self._damaged)
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._store_arrivals, node, job, arrivals)
            try:
                await self._fetch(job, ranges, arrivals=arrivals)
            except Exception as e:  # raised below as itself, not in a group
                error = e
            finally:
                arrivals.close()
        if error is not None:
            raise error
        got = [arrivals.entry(a) for a in arrivals.got if a.key not in arrivals.handled]
        zero = [(w, b"", None) for w in wants if not w.size and not w.derived]
        failed = await self._store(node, job, got + zero)
        failed.update(arrivals.damaged())
        failed.update(arrivals.early_failed())
        if failed:
            await self._refetch(node, job, wants, failed)

    async def _store_arrivals(self, node, job: Job, arrivals: Arrivals) -> None:
        """Store blocks as they arrive while a read waits for the job, so
        that it is served as soon as the blocks it needs are in, not when the
        whole range is. A block is stored early only when it can be verified
        now (its hash blocks are present); the rest waits for `_store`. While
        nobody waits (readahead, prefetch), blocks are stored once, at the end:
        fewer, bigger fills."""
        queued: list[Arrived] = []
        early = True
        while batch := await arrivals.take():
            queued += batch
            if not early or not self._wanted(job):
                continue
            try:
                queued = await self._fill_verifiable(node, job, arrivals, queued)
            except Exception:  # e.g. a full disk: `_store` meets it again and says so
                log.debug("storing arrived blocks of inode %d early failed", job.ino,
                          exc_info=True)
                early = False

    async def _fill_verifiable(self, node, job: Job, arrivals: Arrivals,
                               queued: list[Arrived]) -> list[Arrived]:
        """Fill the queued blocks that can be verified now, hash blocks level
        by level from the top (each level makes the next verifiable), then
        data blocks; return the others."""
        tree = HASH
        while True:
            ready = self._ready(node, job, tree, queued)
            if ready:
                group = [a for a in ready if not self._present(node, tree, a.want.index)]
                if group:
                    refused = await self._fill(node, job, tree, [arrivals.entry(a) for a in group])
                    # data whose built leaf failed stay queued: `_store`
                    # fetches the leaf and stores them then
                    waiting = self._under_unbuilt(node, job, refused)
                    arrivals.failed_early.update({a.key: a.range_index for a in group
                                                  if a.key in refused and a.key not in waiting})
                    ready = [a for a in ready if a.key not in waiting]
                arrivals.handled.update(a.key for a in ready)
                taken = {id(a) for a in ready}
                queued = [a for a in queued if id(a) not in taken]
            if tree == DATA:
                return queued
            if not ready:
                tree = DATA

    def _ready(self, node, job: Job, tree: int, queued: list[Arrived]) -> list[Arrived]:
        """The queued blocks of `tree` that can be stored now: those whose
        hash blocks are present and, for data, those under a leaf the job
        builds, once all its data is in and the hash blocks above it are."""
        mine = [a for a in queued if a.want.tree == tree]
        whole: set[int] = set()
        if tree == DATA and (leaves := job.leaves()):
            arrived = {a.want.index for a in mine}
            geo = node.geometry
            for leaf in leaves:
                under = geo.leaf_group(leaf)
                if all(i in arrived for i in under) and all(
                        node.hashes.is_present(s) for s in parents_needed(node, HASH, (leaf,))):
                    whole.update(under)
        return [a for a in mine if a.want.index in whole or self._verifiable(node, a.want)]

    def _under_unbuilt(self, node, job: Job, keys) -> set[tuple[int, int]]:
        """The data blocks among `keys` under a leaf whose built copy failed
        (refused for want of it, not for their own bytes)."""
        if not job.unbuilt:
            return set()
        unbuilt = {w.index for w in job.unbuilt}
        geo = node.geometry
        return {(t, i) for t, i in keys if t == DATA and geo.leaf_of(i) in unbuilt}

    def _verifiable(self, node, want: Want) -> bool:
        """Whether every hash block `want` is checked with is present."""
        hashes = node.hashes
        return all(hashes.is_present(s)
                   for s in parents_needed(node, want.tree, (want.index,)))

    def _damaged(self, want: Want) -> None:
        """A fetched block's bytes failed its CRC (see Arrivals)."""
        self.stats["crc_failures"] += 1
        self.image.counters["verify_failures"] += 1

    def _max_len(self, job: Job) -> int:
        """Longest range of one request: `request_max` for reads and
        readahead (a 1 MiB read in one range: a burst of small parallel
        ranges loses its tail at the bottleneck's queue and waits for a
        retransmission, see docs/performance.md), `prefetch_chunk` for
        prefetch. A miss still adds at most `amplify` bytes past what it needs."""
        if job.readahead or not job.prefetch:
            return self.cfg.request_max
        return self.cfg.prefetch_chunk

    async def _refetch(self, node, job: Job, wants: list[Want], failed) -> None:
        """Fetch what failed (and hash blocks it still lacks) once more, from
        another mirror when the source has one; fail the reads of what fails
        again."""
        self.stats["refetches"] += 1
        retry: dict[tuple[int, int], Want] = {}
        avoid: set[int] = set()
        for (tree, index), origin in failed.items():
            w = next((w for w in wants if w.tree == tree and w.index == index), None)
            if w is not None and w.size:
                retry[(tree, index)] = w
            if origin is not None:
                avoid.add(origin)
        deps = self.planner.missing_deps(node, [i for (t, i) in failed if t == DATA])
        self._claim(job, deps)
        job.wants.extend(deps)
        for w in deps:
            retry[(w.tree, w.index)] = w
        got2, bad2 = await self._fetch(job, plan_ranges(list(retry.values()), self.cfg.amplify, 0),
                                       avoid=avoid)
        still = await self._store(node, job, got2)
        still.update(bad2)
        for (tree, index) in failed:
            if (tree, index) not in retry and not self._present(node, tree, index):
                still[(tree, index)] = None  # e.g. a zero block that does not verify
        lost = [(job.ino, t, i) for (t, i) in still if not self._present(node, t, i)]
        if not lost:
            return
        # Every copy failed: is this still the image the cache is of?
        try:
            await self._check_source()  # raises ObjectChangedError when not
        except CorruptImage:
            pass  # damaged too: the blocks fail as damaged
        self.stats["blocks_failed"] += len(lost)
        self._fail_waiters(job, lost, FetchFailed(
            f"inode {job.ino}: {len(lost)} block(s) failed verification from every "
            "source tried"))

    def _present(self, node, tree: int, index: int) -> bool:
        target = node.data if tree == DATA else node.hashes
        return target is not None and target.is_present(index)

    def _level(self, job: Job) -> int:
        if not job.prefetch:
            return READ
        return READAHEAD if job.readahead else PREFETCH

    async def _fetch(self, job: Job, ranges: list[Range], avoid: set[int] | None = None, *,
                     arrivals: Arrivals | None = None):
        """Read ranges in parallel (one request slot each), their blocks
        going to `arrivals` (a new one unless given: then streamed, see
        `_store_arrivals`). Returns ([(want, stored bytes, origin mirror)],
        {(tree, index): origin} of blocks whose bytes fail their CRC).
        Raises the first SourceError."""
        streamed = arrivals is not None
        arrivals = arrivals or Arrivals(ranges, self._damaged)
        errors: list[BaseException] = []

        async def one(i: int, r: Range, cancel: trio.CancelScope) -> None:
            try:
                progress = arrivals.progress(i) if streamed else None
                data, origin = await self._fetch_range(job, r, avoid, progress)
            except Exception as e:
                errors.append(e)
                cancel.cancel()
                return
            arrivals.finish(i, data, origin)

        async with trio.open_nursery() as nursery:
            for i, r in enumerate(ranges):
                nursery.start_soon(one, i, r, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return [arrivals.entry(a) for a in arrivals.got], arrivals.damaged()

    async def _fetch_range(self, job: Job, r: Range, avoid, progress=None):
        order = job.queued[1] if job.queued is not None else None
        level = await self.slots.acquire(self._level(job), urgent=lambda: self._wanted(job),
                                         nbytes=r.length, order=order)
        self._dequeue(job)
        landed = 0  # bytes of the answer in: off the wire (Slots.landed)

        def arrived(body: bytes | bytearray) -> None:
            nonlocal landed
            now = min(len(body), r.length)  # (a retry starts the body again)
            self.slots.landed(level, now - landed)
            landed = now
            if progress is not None:
                progress(body)

        try:
            data, origin = await self._timed(self._read(r.offset, r.length, avoid, arrived),
                                             r.length)
        finally:
            self.slots.release_slot(level, r.length - landed)
        self.stats["requests"] += 1
        self.stats["bytes_transferred"] += len(data)
        self.prefetch_backoff = 1.0
        self._online()
        return data, origin

    async def _timed(self, request, nbytes: int):
        """Await a source request, timing it for the link estimate."""
        self.link.started()
        t0, got = time.monotonic(), 0
        try:
            result = await request
            got = nbytes
            return result
        finally:
            self.link.finished(got, time.monotonic() - t0 if got else 0.0)

    def _depth(self) -> int:
        """Bytes readahead and prefetch keep on the wire: bandwidth x RTT
        with a margin, at least two requests, at most the budget."""
        return self.link.depth(2 * self.cfg.request_max, self.cfg.inflight_budget)

    async def _read(self, offset: int, length: int, avoid: set[int] | None, progress=None):
        src = self.reading_from
        if isinstance(src, MirroredSource):
            if avoid and len(avoid) < len(src.mirrors):
                return await src.read_from_other(offset, length, sorted(avoid))
            return await src.read_with_origin(offset, length, progress=progress)
        if progress is not None:
            return await src.read_streaming(offset, length, progress), None
        return await src.read(offset, length), None

    async def _store(self, node, job: Job, items) -> dict[tuple[int, int], int | None]:
        """Fill fetched blocks (hash blocks first, each waiting for parents
        another request is fetching); release what got stored. Returns the
        (tree, index) of blocks that were not stored, with their origin."""
        failed: dict[tuple[int, int], int | None] = {}
        mine = {(w.tree, w.index) for w, _, _ in items}
        for tree in (HASH, DATA):
            group = [(w, b, o) for w, b, o in items if w.tree == tree
                     and not self._present(node, tree, w.index)]
            if group:
                await self._wait_for_parents(node, tree, [w.index for w, _, _ in group],
                                             mine, job)
                failed.update(await self._fill(node, job, tree, group))
        if job.unbuilt:
            failed = await self._fetch_unbuilt(node, job, items, failed)
        return failed

    async def _fetch_unbuilt(self, node, job: Job, items, failed):
        """Leaves whose built copy failed its check (some data under them is
        not the signed data, or the source changed): fetch them, then store
        again the data that waited for them, so only the blocks that fail
        against the fetched leaf are fetched again (by `_refetch`)."""
        leaves = [w for w in job.unbuilt if not self._present(node, HASH, w.index)]
        job.unbuilt = []
        if not leaves:
            return failed
        self.stats["leaves_fetched"] += len(leaves)
        got, bad = await self._fetch(job, plan_ranges(leaves, self.cfg.amplify, 0))
        failed.update(bad)
        failed.update(await self._fill(node, job, HASH, got))
        again = [(w, b, o) for w, b, o in items if w.tree == DATA and (DATA, w.index) in failed
                 and not self._present(node, DATA, w.index)]
        for w, _, _ in again:
            del failed[(DATA, w.index)]
        failed.update(await self._fill(node, job, DATA, again))
        return failed

    async def _fill(self, node, job: Job, tree: int, group) -> dict[tuple[int, int], int | None]:
        blocks = [FillBlock(w.index, b, w.kind, TreeKind(tree)) for w, b, _ in group]
        leaves = job.leaves() if tree == DATA else ()
        result = await self.service.fill(node.ino, blocks, fetched=True, leaves=leaves)
        self._note_leaves(job, result)
        errors = {index for index, _code, _why in result.errors}
        waiting = self._under_unbuilt(node, job, {(tree, i) for i in errors})
        failed: dict[tuple[int, int], int | None] = {}
        stored, refused = [], 0
        for w, b, origin in group:
            if w.index in errors and not self._present(node, tree, w.index):
                failed[(tree, w.index)] = origin
                if (tree, w.index) in waiting:  # stored again once their leaf is in
                    self.service.counters["bytes_fetched"] -= len(b)
                else:
                    refused += len(b)
            else:
                stored.append((node.ino, tree, w.index))
                self.stats["blocks_fetched"] += 1
                if job.background:
                    self.stats["prefetch_blocks"] += 1
                    self.stats["prefetch_bytes"] += len(b)
        if refused:
            # Service.fill counts every block handed to it; refused blocks
            # were not fetched in any useful sense (R14: bytes_fetched is
            # what the cache gained), so take them back out.
            self.service.counters["bytes_fetched"] -= refused
            self.stats["bytes_refused"] += refused
        self._release(job, stored)
        return failed

    def _note_leaves(self, job: Job, result) -> None:
        """Leaves a fill built from the job's data: stored ones are released;
        refused ones are fetched instead (see `_fetch_unbuilt`)."""
        if result.leaves_built:
            self.stats["leaves_built"] += len(result.leaves_built)
            self._release(job, [(job.ino, HASH, s) for s in result.leaves_built])
        for s in result.leaves_refused:
            w = next(w for w in job.wants if w.tree == HASH and w.index == s)
            w.derived = False
            job.unbuilt.append(w)

    async def _wait_for_parents(self, node, tree: int, indexes: list[int], mine, job) -> None:
        """Wait (bounded) for hash blocks these blocks are verified with when
        another request is fetching them right now."""
        if node.hashes is None:
            return
        events = [self.inflight[(node.ino, HASH, s)]
                  for s in parents_needed(node, tree, indexes)
                  if (HASH, s) not in mine and not node.hashes.is_present(s)
                  and (node.ino, HASH, s) in self.inflight
                  and (node.ino, HASH, s) not in job.keys]
        if not events:
            return
        # Give the reservation back while waiting: the job fetching those
        # hash blocks may be waiting for budget this one holds.
        self.slots.release_bytes(job.held)
        job.held = 0
        with trio.move_on_after(self.cfg.dep_wait):
            for event in events:
                await event.wait()
