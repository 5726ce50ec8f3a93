"""Background prefetch: what nobody read yet, at the lowest priority.

"none", "sequential" (the data region in source order: hash trees first,
then profiled blocks, then the rest, as `pack` lays them out) or
"profile:FILE" (those blocks first, then sequential), with an optional
bandwidth cap. Prefetch never starts a request while a read's or a
readahead's request waits for a slot.
"""

from __future__ import annotations

import logging
import time

import trio

from .. import BLOCK_SIZE
from ..errors import IncfsError
from ..format.records import info_bytes, info_size
from ..integrity import merkle
from ..profile import resolve
from .config import check_prefetch  # noqa: F401  (its home once; kept importable here)
from .plan import DATA, HASH, Job
from .schedule import READ, READAHEAD

log = logging.getLogger("incfs.loader")


# Blocks looked at between two checkpoints while the runs are worked out in
# the event loop: ~1.6 us each here, so a request that comes in meanwhile
# (a program's first listing, right after the mount is up) waits ~0.4 ms.
# 2048 made that listing 3-5 ms slower.
RUNS_SLICE_BLOCKS = 256


def source_runs(source_maps) -> list[tuple[int, int, int, int, int]]:
    """(source offset, ino, tree, first index, count) of runs of blocks that
    lie one after another in the source, sorted by offset."""
    runs = [run for file_runs, _ in _runs_by_file(source_maps) for run in file_runs]
    runs.sort()
    return runs


async def source_runs_in_slices(source_maps, slice_blocks: int = RUNS_SLICE_BLOCKS
                                ) -> list[tuple[int, int, int, int, int]]:
    """source_runs, worked out in the event loop a slice at a time, a big
    file's map too (a 1 GiB file has 262,144 blocks: ~0.4 s of Python). It
    is pure Python: a worker thread would compute no faster (the GIL), and
    each request the loop serves meanwhile would wait up to the
    interpreter's switch interval (5 ms) for the GIL; here it waits one
    slice at most."""
    runs: list[tuple[int, int, int, int, int]] = []
    since = 0
    for piece, looked_at in _runs_by_file(source_maps, slice_blocks):
        runs.extend(piece)
        since += looked_at
        if since >= slice_blocks:
            await trio.lowlevel.checkpoint()
            since = 0
    runs.sort()  # in pack order already, or nearly: one linear pass
    return runs


def _runs_by_file(source_maps, slice_blocks: int | None = None):
    """(runs, blocks looked at) per file and tree, or per `slice_blocks`
    blocks of one (see _runs_of). A map that lays its blocks back to back
    (what `pack` writes for a file with a hash tree) is one run, known from
    its head (`laid_out`, an indexed cache's): a 1 GiB image's 100 files
    take ~1 ms instead of the ~120 ms of decoding and walking each map."""
    laid_out = getattr(source_maps, "laid_out", None)
    for ino in source_maps:
        spans = laid_out(ino) if laid_out is not None else None
        maps = None
        for tree in (DATA, HASH):
            if spans is not None and spans[tree] is not None:
                base, count = spans[tree]
                yield ([(base, ino, tree, 0, count)] if count else []), 1
                continue
            if maps is None:
                maps = source_maps[ino]
            if maps[tree] is not None:
                yield from _runs_of(ino, tree, maps[tree], slice_blocks)


def _runs_of(ino: int, tree: int, smap, slice_blocks: int | None = None):
    """Yield (runs, blocks looked at) for one map: after every
    `slice_blocks` blocks (None: once) the runs closed so far, and at the
    end the rest."""
    runs: list[tuple[int, int, int, int, int]] = []
    start = first = prev = None
    end = looked = 0
    for i, offset, info, _crc in smap.entries():
        size = info_bytes(info)
        continuing = prev is not None and i == prev + 1 and (
            not size or start is None or end <= offset <= end + BLOCK_SIZE)
        if not continuing:
            if first is not None:
                runs.append((start or 0, ino, tree, first, prev - first + 1))
            first, start = i, (offset if size else None)
            end = offset + size if size else 0
        elif size:
            if start is None:
                start = offset
            end = offset + size
        prev = i
        looked += 1
        if looked == slice_blocks:
            yield runs, looked
            runs, looked = [], 0
    if first is not None:
        runs.append((start or 0, ino, tree, first, prev - first + 1))
    yield runs, looked


class PrefetchBatch:
    """Blocks of one file (and tree) gathered for one prefetch job.

    A batch of data that reached `max_bytes` ends where a leaf group does
    (up to 128 blocks later): the job then fetches whole groups and builds
    their leaf hash blocks instead of fetching them (Planner.plan)."""

    def __init__(self, max_bytes: int, max_blocks: int = 4096):
        self.max_bytes, self.max_blocks = max_bytes, max_blocks
        self.key: tuple[int, int] | None = None
        self.indexes: list[int] = []
        self.nbytes = 0

    def full_or_other(self, ino: int, tree: int, index: int) -> bool:
        """Whether block `index` of (ino, tree) must go in a new batch."""
        if not self.indexes:
            self.key = (ino, tree)
            return False
        if self.key != (ino, tree) or len(self.indexes) >= self.max_blocks:
            return True
        if self.nbytes < self.max_bytes:
            return False
        per = merkle.HASHES_PER_BLOCK
        return tree != DATA or index // per != self.indexes[-1] // per

    def add(self, ino: int, tree: int, index: int, nbytes: int) -> None:
        self.key = (ino, tree)
        self.indexes.append(index)
        self.nbytes += nbytes

    def take(self) -> tuple[int, int, list[int]]:
        ino, tree = self.key or (0, 0)
        indexes, self.indexes, self.nbytes = self.indexes, [], 0
        return ino, tree, indexes


class PrefetchMixin:
    """The Loader's background part. Relies on the Loader's image, cfg,
    slots, bucket, inflight, stopped, `_plan`, `_run_job` and the reuse
    mixin's `_open_base`/`_reuse_pass`."""

    async def _background(self) -> None:
        self.prefetch_pause_until = 0.0
        await self._open_base()
        mode = self.cfg.prefetch
        if self.base is not None and mode != "none":
            await self._reuse_pass()
        if mode == "none":
            self.prefetch_state = "off"
            return
        if mode.startswith("profile:"):
            self.prefetch_state = "profile"
            await self._prefetch_profile(mode[len("profile:"):])
        await self._prefetch_all()

    async def _prefetch_all(self) -> None:
        """Sequential passes until every block is here (a pass leaves what
        failed or what reads were fetching; later passes pick it up)."""
        pause = 1.0
        while not self._complete_now():
            if self.stopped:
                self.prefetch_state = "stopped"
                return
            self.prefetch_state = "sequential"
            before = self.image.totals()["blocks_present"]
            await self._prefetch_runs()
            await self._prefetch_idle()
            if self._complete_now():
                break
            self.prefetch_state = "retrying"
            progressed = self.image.totals()["blocks_present"] > before
            await trio.sleep(0.2 if progressed else pause)  # a backoff, not a capacity wait
            pause = 1.0 if progressed else min(pause * 2, 30.0)
        await self._on_complete()

    async def _prefetch_profile(self, path: str) -> None:
        try:
            entries = await trio.to_thread.run_sync(resolve, self.image, path)
        except (IncfsError, OSError) as e:
            log.warning("profile %s not used: %s", path, e)
            self.last_error = f"profile {path}: {e}"
            return
        per_job = max(1, self.cfg.prefetch_chunk // BLOCK_SIZE)
        for start in range(0, len(entries), per_job):
            by_ino: dict[int, list[int]] = {}
            for ino, index in entries[start:start + per_job]:
                by_ino.setdefault(ino, []).append(index)
            for ino, indexes in by_ino.items():
                await self._prefetch_gate()
                job = self._plan(ino, indexes, [], extend=0, prefetch=True)
                if job is not None:
                    self._launch_prefetch(job)

    async def _prefetch_runs(self, tree_filter: int | None = None) -> None:
        """Fetch absent blocks in source order.

        Jobs gather blocks across consecutive runs of the same file: packing
        deduplicates identical blocks, so a file's map can break into many
        one-block runs whose bytes lie elsewhere; `plan_ranges` then joins
        them by offset instead of sending one request per block.

        Hash trees lie first in the source, one small run per file; a job per
        file for those would be a round trip for a few KiB each (100 files:
        2.5 s of a 100 ms link doing next to nothing). Without a filter, the
        hash blocks of a file whose data is still to come are left to its
        data jobs, which take the hash blocks they need beside their data
        (Planner.plan); a later pass fetches any that are left.

        Not before the first read is served (Service.settled, or 0.5 s after
        the mount is up): prefetch's first requests, sent at READY, filled
        the link just as the program's first read came, whose answer then
        queued behind theirs (20 ms, 1 GiB: that read took 65-71 ms, 30-34
        after). The first read asks for what it needs anyway."""
        await self.service.settled()
        runs = await source_runs_in_slices(self.image.source_maps)
        if runs and self.prefetch_at is None:
            self.prefetch_at = runs[0][0]  # reads near the start are on its way
        batch = PrefetchBatch(self.cfg.prefetch_chunk)
        for _offset, ino, tree, first, count in runs:
            if self.stopped:
                return
            if tree_filter is not None and tree != tree_filter:
                continue
            node = self.image.ns.inodes.get(ino)
            if node is None or node.data is None:
                continue
            if tree == HASH and tree_filter is None and not node.data.complete:
                continue  # they come with the data (see above)
            target = node.data if tree == DATA else node.hashes
            smap = self.image.source_maps[ino][0 if tree == DATA else 1]
            if target is None or smap is None:
                continue
            for i in range(first, first + count):
                if batch.full_or_other(ino, tree, i):
                    await self._launch_batch(batch)
                if not target.is_present(i) and (ino, tree, i) not in self.inflight:
                    loc = smap.get(i)
                    batch.add(ino, tree, i, info_size(loc[1]) if loc else 0)
        await self._launch_batch(batch)

    async def _launch_batch(self, batch: PrefetchBatch) -> None:
        ino, tree, indexes = batch.take()
        if not indexes:
            return
        await self._prefetch_gate()
        if tree == DATA:
            job = self._plan(ino, indexes, [], extend=0, prefetch=True)
        else:
            job = self._plan(ino, [], indexes, extend=0, prefetch=True)
        if job is not None:
            self._launch_prefetch(job)

    def _prefetch_may_start(self) -> bool:
        s = self.slots
        return (self.prefetch_running < self.prefetch_width and not s.waiting[READ]
                and not s.busy[READ] and not s.waiting[READAHEAD] and not self.far_reads)

    async def _prefetch_gate(self) -> None:
        """Wait until prefetch may start a job: fewer than `prefetch_width`
        (at most `prefetch_slots`) prefetch jobs running, no read's request
        running or waiting for a slot, no readahead waiting, no pause after
        errors or a read's miss or readahead elsewhere (core._note_far), and the
        bandwidth cap's debt repaid. Blocks are claimed only after this, so a
        read never waits behind a prefetch job that has not started. Returns at
        once when fetching stopped (the callers then launch nothing)."""
        await trio.lowlevel.checkpoint()
        while not self.stopped:
            pause = max(self.prefetch_pause_until, self.prefetch_yield_until) - time.monotonic()
            if pause > 0:
                await trio.sleep(pause)
            elif self.bucket is not None and self.bucket.in_debt:
                await self.bucket.wait()
            elif self._prefetch_may_start():
                return
            else:
                await self.slots.changed.wait()  # every change of the above notifies

    def _launch_prefetch(self, job: Job) -> None:
        if self.stopped:
            self._release(job, list(job.keys))
            return
        job.background = True
        job.far_mark = self.stats["prefetch_yields"]
        ends = [w.offset + w.size for w in job.wants if w.size]
        if ends:
            self.prefetch_at = max(ends)
        if self.bucket is not None:
            # charged now, not when its requests go out: the gate must see
            # the debt before it lets the next job start
            self.bucket.charge(job.nbytes)
        self.prefetch_running += 1
        self._nursery.start_soon(self._run_job, job)

    async def _prefetch_idle(self) -> None:
        while self.prefetch_running:
            await self.slots.changed.wait()
