"""The running loader: pending reads first, readahead, fetching, storing,
retries, status, and what happens when the source changes.

* pending reads first: each new pending read becomes a request at once.
  Its absent neighbours in the same file are added up to `amplify` bytes of
  source range, plus the hash-tree blocks that verify them, fetched in
  parallel ranges (schedule.Slots decides who may send). The sources layer
  retries with backoff, and this loader keeps retrying a block while a read
  still waits for it (a network blip delays reads but never fails them; the
  read timeout decides).
* sequential readers get a readahead window that grows while they keep up
  (schedule.Readahead), split in ranges fetched over several connections.
* blocks are stored as fetched (no recompression) through `Service.fill`,
  which verifies them against the signed Merkle tree first. A block that
  fails is fetched once more, from another mirror when there is one; if it
  fails again (or the source refuses it for good), the reads waiting for it
  fail with EIO instead of waiting forever.
* when the source now holds another image (its superblock, ETag or size
  changed), fetching stops: the mount goes offline with status "source
  changed", keeps serving what is present, and reads of absent blocks fail
  with EIO at once (waiting could not help; a remount switches to the new
  image, reusing the blocks that did not change).

Fetched blocks are not synced one batch at a time (the cache is
`durable=False`; a lost block is fetched again): the loader syncs every few
seconds and at close.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import trio

from .. import BLOCK_SIZE
from ..errors import CorruptImage
from ..format.layout import SUPERBLOCK_SIZE, Superblock
from ..format.records import BlockKind, info_kind
from ..image import Image
from ..integrity import merkle
from ..space.plainfiles import plain_directory
from ..sources import MirroredSource, ObjectChangedError, Source, SourceError
from ..waits import nothing_fetched
from .cache import image_complete
from .config import LoaderConfig
from .jobs import FetchFailed, JobRunner
from .link import LinkEstimate
from .plan import HASH, Job, Key, Planner, Want, aligned_slices, leaf_within
from .prefetch import PrefetchMixin, source_runs_in_slices
from .ondemand import SourceOnDemand
from .remote import open_loader_source
from .reuse import ReuseMixin
from .tail import TailMixin
from .schedule import (PREFETCH, READ, READAHEAD, Readahead, Slots, SourceOrder,
                       TokenBucket)

log = logging.getLogger("incfs.loader")


def start_loader(config, service, nursery, source: Source | None = None) -> "Loader":
    """Start the built-in loader for a mount's Service in `nursery`; the
    returned object's `aclose()` stops it and syncs the cache. `source`, if
    given, is the loader's from now on (else it opens its own)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    loader = Loader(config, service, source=source)
    nursery.start_soon(loader.run)
    return loader


class Loader(JobRunner, PrefetchMixin, ReuseMixin, TailMixin):
    def __init__(self, config, service, settings: LoaderConfig | None = None,
                 source: Source | None = None):
        self.config = config
        self.cfg = settings or LoaderConfig.from_mount(config)
        self.service = service
        self.image: Image = service.image
        self.waits = service.waits
        cfg = self.cfg
        self.bucket = TokenBucket(cfg.bandwidth) if cfg.bandwidth else None
        self.link = LinkEstimate()
        self.slots = Slots(cfg.max_inflight, cfg.prefetch_slots, cfg.inflight_budget,
                           depth=self._depth)
        # a window of twice the depth: the next one is asked for while the
        # reader is half-way through this one, so the pipe never drains
        self.readahead = Readahead(cfg.amplify, cfg.readahead_max, self._launch_readahead,
                                   after=cfg.readahead_after, cap=lambda: 2 * self._depth(),
                                   align=merkle.HASHES_PER_BLOCK,
                                   drained=lambda n: self.slots.drained(READAHEAD, n))
        self.inflight: dict[Key, trio.Event] = {}
        self.planner = Planner(self.image, self.inflight.__contains__)
        self.source: Source | None = source
        # reads while the client is imported, when the metadata came without
        # it (see _choose_source)
        self.demand: SourceOnDemand | None = None
        self._source_warm = source is not None  # open_cache just read the metadata over it
        self.base: Image | None = None
        self.base_index: dict[int, int] = {}
        self._base_ready = trio.Event()  # set once an older image is indexed (or there is none)
        self._started_at = trio.current_time()
        self.info = dict(getattr(self.image, "cache_info", None) or {})
        self.prefetch_running = 0
        self.prefetch_pause_until = 0.0
        self.prefetch_yield_until = 0.0  # a read missed, or readahead ran, elsewhere (_note_far)
        self.far_reads = 0  # jobs of such misses running
        # prefetch jobs that may run at once: one at first and after a far
        # miss, twice as many each time a job ends with no far miss meanwhile (up
        # to prefetch_slots): jobs started before a program's first read
        # cannot be called back, so prefetch starts narrow
        self.prefetch_width = 1
        self.prefetch_at: int | None = None  # source offset prefetch fetches next
        self.prefetch_backoff = 1.0
        self.stopped = False  # the source changed: fetch nothing more
        self._stored_mark = -1
        self._complete_checked = 0.0
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._completed = False
        self._synced_end = -1
        self._last_sweep = 0.0
        self.stats = {"requests": 0, "bytes_transferred": 0, "errors": 0, "retries": 0,
                      "crc_failures": 0, "bytes_refused": 0,
                      "refetches": 0, "blocks_failed": 0, "blocks_fetched": 0,
                      "blocks_reused": 0, "bytes_reused": 0, "pending_jobs": 0,
                      "readahead_jobs": 0, "prefetch_blocks": 0, "prefetch_bytes": 0,
                      "prefetch_yields": 0, "leaves_built": 0, "leaves_fetched": 0,
                      "first_answer_blocks": 0}
        self.last_error: str | None = None
        self.state = self.info.get("state", "starting")
        self.prefetch_state = "off" if cfg.prefetch == "none" else "waiting"
        self._cleaned = False
        self._keep_first_rest()
        if image_complete(self.image):
            self._mark_complete()  # nothing to fetch: say so before the mount is ready
        self._update_status()

    # --- life ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                if image_complete(self.image):
                    await self._on_complete()
                    # No network unless a stored block turns out bad: the
                    # service then forgets it and its read waits for a fetch.
                    while not await self.waits.next_pending(3600.0):
                        pass
                if self.source is None:
                    self._choose_source()
                for hooks, hook in self._waits_hooks():
                    hooks.append(hook)
                self.waits.fetching = self.inflight.__contains__
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._store_first_rest)
                    nursery.start_soon(self._pending_loop)
                    nursery.start_soon(self._background)
                    nursery.start_soon(self._flusher)
                    nursery.start_soon(self._status_loop)
                    nursery.start_soon(self._warm_up)
                    nursery.start_soon(self._learn_order)
                    if self.demand is not None:
                        nursery.start_soon(self._open_source)
        except Exception:
            log.exception("loader stopped")
            self.state = "failed"
            self._update_status()
        finally:
            self._drop_first_rest()
            for hooks, hook in self._waits_hooks():
                if hook in hooks:
                    hooks.remove(hook)
            if self.waits.fetching == self.inflight.__contains__:
                self.waits.fetching = nothing_fetched
            self._done.set()

    def _choose_source(self) -> None:
        """The loader's own source, or, for a cache whose metadata open_cache
        read without the HTTP client (incfs.loader.early), reads over the
        early connections until `_open_source` has the client (the answer's
        identity holds them to the same object)."""
        identity = self.info.get("identity")
        if identity is None:
            self.source = open_loader_source(self.config)
            return
        self.demand = SourceOnDemand(self.config, identity=identity)
        # its connections were opened early and idle, and the image was read
        # a moment ago: no warm-up (see _warm_up)
        self._source_warm = True

    async def _open_source(self) -> None:
        """Import the client (a worker thread, ~30 ms) and open the source
        once the first read is served, or SETTLE_WAIT after READY: the
        import holds the GIL, and the first read's request, its answer and
        the reply would wait behind it. A read that finds no early
        connection idle opens it sooner. The source takes what the early
        answer said of the object as first seen: an answer of another image
        is then refused."""
        assert self.demand is not None
        await self.service.settled()
        self.source = await self.demand.get()
        self._update_status()

    def _waits_hooks(self) -> list[tuple[list, Callable]]:
        """What the loader hears from the mount's reads (incfs.waits), while
        it runs: every read (readahead), a refused tail (fetched at once), a
        file opened in passthrough (a walk goes past it)."""
        w = self.waits
        return [(w.read_hooks, self.readahead.note_read),
                (w.spared_hooks, self._launch_readahead),
                (w.passthrough_hooks, self.readahead.note_passthrough)]

    async def aclose(self) -> None:
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._done.wait()
            if self.image.fd >= 0 and self.image.appender is not None:
                await trio.to_thread.run_sync(os.fsync, self.image.fd)
            source = self.reading_from
            if source is not None:
                try:
                    await source.aclose()
                except Exception as e:  # closing must not fail the unmount
                    log.debug("closing source: %s", e)
            self._close_base()
            self._update_status()

    async def _warm_up(self) -> None:
        """Open a few connections now (reading the superblock on each), so
        the first misses do not pay for handshakes, and check on the way that
        the source still holds the image this cache is of. Not for a source
        open_cache handed over: it read this very image a moment ago over a
        connection still open, which the first miss then takes (warming would
        keep that one busy, and the first miss would pay a handshake)."""
        if self._source_warm:
            self._online()
            return
        async def one() -> None:
            await self._check_source()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.cfg.warm_connections, self.cfg.max_inflight)):
                    nursery.start_soon(one)
            self._online()
        except* ObjectChangedError as group:
            self._source_changed(str(group.exceptions[0]))
        except* (SourceError, CorruptImage) as group:
            self._note_error(group.exceptions[0])

    async def _learn_order(self) -> None:
        """Index the source order of files for readahead across files, once
        the mount is up and its first read served (Service.settled): it took
        ~6 ms of the start otherwise (a worker thread holding the GIL), and
        nothing reads across files before a first file is read."""
        await self.service.settled()
        runs = await source_runs_in_slices(self.image.source_maps)
        self.readahead.order = await trio.to_thread.run_sync(
            SourceOrder, runs, self._data_offset, self._data_blocks)

    def _data_offset(self, ino: int, index: int) -> int | None:
        maps = self.image.source_maps.get(ino)
        loc = maps[0].get(index) if maps is not None and maps[0] is not None else None
        return None if loc is None or info_kind(loc[1]) is BlockKind.ZERO else loc[0]

    def _data_blocks(self, ino: int) -> int:
        node = self.image.ns.inodes.get(ino)
        return node.data.count if node is not None and node.data is not None else 0

    async def _check_source(self) -> None:
        """Raise ObjectChangedError when the source's superblock is that of
        another image than this cache's (CorruptImage when it is damaged: bytes
        damaged on the way are no proof of another image)."""
        head, _ = await self._timed(self._read(0, SUPERBLOCK_SIZE, None), SUPERBLOCK_SIZE)
        uuid = Superblock.decode(head).uuid
        if uuid != self.image.superblock.uuid:
            raise ObjectChangedError(f"{self.reading_from.name} now holds another image "
                                     f"(uuid {uuid.hex()[:12]}, this cache is of "
                                     f"{self.image.superblock.uuid.hex()[:12]})")

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(self.cfg.flush_interval)
            await self._sync()

    async def _sync(self) -> None:
        app = self.image.appender
        if app is None or self.image.fd < 0 or app.end == self._synced_end:
            return
        end = app.end
        await trio.to_thread.run_sync(os.fdatasync, self.image.fd)
        self._synced_end = end

    async def _status_loop(self) -> None:
        while True:
            self._update_status()
            if not self._completed and self._maybe_complete():
                await self._on_complete()
            await trio.sleep(self.cfg.status_interval)

    def _complete_now(self) -> bool:
        return image_complete(self.image)

    def _maybe_complete(self) -> bool:
        """Whether every block is here, checked only after something was
        stored (or every 10 s): totals() walks every inode."""
        c = self.service.counters
        mark = c["bytes_fetched"] + c["bytes_filled"] + c["bytes_reused"] + \
            self.image.counters["blocks_stored"]
        now = time.monotonic()
        if mark == self._stored_mark and now - self._complete_checked < 10.0:
            return False
        self._stored_mark, self._complete_checked = mark, now
        return image_complete(self.image)

    def _mark_complete(self) -> None:
        self._completed = True
        self.state = "complete"
        self.prefetch_state = "done" if self.cfg.prefetch != "none" else "off"

    async def _on_complete(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._mark_complete()
        await self._sync()
        if self.info.get("base_is_old"):
            self._close_base()
            if self.info.get("base"):
                Path(self.info["base"]).unlink(missing_ok=True)
                shutil.rmtree(plain_directory(Path(self.info["base"])), ignore_errors=True)
                self.info["base"] = None
        self._update_status()

    # --- status ----------------------------------------------------------------

    def _online(self) -> None:
        if self.stopped:
            return
        if self.state in ("offline", "starting", "created", "resumed", "updated"):
            self.state = "online"
            self.info["offline"] = None

    def _note_error(self, error: BaseException) -> None:
        """A request failed for good (after the sources layer's retries)."""
        self.stats["errors"] += 1
        self.last_error = str(error)
        log.info("source error: %s", error)

    def _source_changed(self, why: str) -> None:
        """The source holds another image now: stop fetching for good (every
        block would fail its check), say so, keep serving what is present."""
        if self.stopped:
            return
        self.stopped = True
        self.state = "offline"
        message = (f"source changed: {why}. Serving the blocks present; fetching stopped. "
                   "To update to the new image, remount (unmount, then mount again: blocks "
                   "that did not change are reused)")
        self.info["offline"] = self.last_error = message
        log.warning("%s", message)
        error = FetchFailed(message)
        for key in list(self.waits.pending):
            self.waits.fail(key, error)
        self.slots.changed.notify()  # wake the prefetch gate: it ends
        self._update_status()

    def _update_status(self) -> None:
        src = self.reading_from
        sources = []
        if isinstance(src, MirroredSource):
            sources = src.mirror_stats()
        elif src is not None:
            sources = [{"name": src.name, **src.stats.as_dict()}]
        for entry in sources:  # failed attempts per source, retried ones included
            if entry["errors"]:
                self.service.source_errors[entry["name"]] = entry["errors"]
        cfg, slots = self.cfg, self.slots
        status = {
            "source": src.name if src is not None else self.config.source,
            "sources": sources,
            "state": self.state,
            "offline": self.info.get("offline"),
            "source_changed": self.stopped,
            "cache": self.info.get("cache"),
            "metadata_bytes": self.info.get("metadata_bytes", 0),
            "complete": self._completed,
            "inflight": slots.busy_total,
            "inflight_pending": slots.busy[READ],
            "inflight_readahead": slots.busy[READAHEAD],
            "inflight_prefetch": slots.busy[PREFETCH],
            "inflight_bytes": slots.bytes,
            "inflight_bytes_peak": slots.peak_bytes,
            "inflight_budget": cfg.inflight_budget,
            "blocks_in_flight": len(self.inflight),
            "amplify": cfg.amplify,
            "max_inflight": cfg.max_inflight,
            "readahead_max": cfg.readahead_max,
            "readahead_window_max": self.readahead.maximum,
            "readahead_walk_windows": self.readahead.walk_windows,
            "readahead_held_windows": self.readahead.held_windows,
            "link": self.link.as_dict(2 * cfg.request_max, cfg.inflight_budget),
            "bandwidth": self.bucket.rate if self.bucket else None,
            "prefetch": {"mode": cfg.prefetch, "state": self.prefetch_state,
                         "blocks": self.stats["prefetch_blocks"],
                         "bytes": self.stats["prefetch_bytes"],
                         "yields": self.stats["prefetch_yields"],
                         "width": self.prefetch_width},
            "base": self.info.get("base"),
            "first_answer": self.first_answer,
            "last_error": self.last_error,
            **{k: v for k, v in self.stats.items() if not k.startswith("prefetch_")},
        }
        self.service.loader_status.clear()
        self.service.loader_status.update(status)

    # --- pending reads and readahead ---------------------------------------------

    async def _pending_loop(self) -> None:
        serial = 0
        while True:
            found = await self.waits.next_pending(self.cfg.sweep_interval, serial)
            keys = [(pr.ino, pr.tree, pr.index) for pr in found]
            if found:
                serial = max(serial, found[-1].serial)
            now = time.monotonic()
            if not found or now - self._last_sweep >= self.cfg.sweep_interval:
                # anything waiting that no request covers (a request gave up)
                self._last_sweep = now
                keys.extend(self.waits.pending)
            self._dispatch(keys)

    def _dispatch(self, keys) -> None:
        if self.stopped:
            self._fail_stopped(keys)
            return
        by_ino: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        promoted = False
        for key in keys:
            ino, tree, index = key
            if key in self.inflight:
                promoted = True  # a queued readahead/prefetch request may turn urgent
                continue
            by_ino[ino][1 if tree == HASH else 0].append(index)
        if promoted:
            self.slots.changed.notify()
        for ino, (data, hashes) in by_ino.items():
            for part, part_hashes in self._read_parts(sorted(data), hashes):
                job = self._plan(ino, part, part_hashes, extend=self._miss_extent(ino, part),
                                 prefetch=False)
                if job is not None:
                    self.stats["pending_jobs"] += 1
                    self._note_far(job)
                    self._nursery.start_soon(self._run_job, job)

    def _note_far(self, job: Job) -> None:
        """A read missed, or readahead runs ahead of a reader: unless that is
        near where prefetch is fetching, prefetch yields the link while the
        job runs and `prefetch_yield` seconds after (`_yield_after`): the
        program's next read comes then. Readahead too, or prefetch takes half
        the link from a program streaming a file it has not reached (reading
        every tenth file at 100 ms, it fetched 17 % more than was read)."""
        at = self.prefetch_at
        offsets = [w.offset for w in job.wants if w.size and w.tree != HASH]
        if at is None or not offsets or abs(min(offsets) - at) <= self.cfg.prefetch_near:
            return
        job.far = True
        self.far_reads += 1
        self.prefetch_width = 1
        self.stats["prefetch_yields"] += 1  # also the far-miss count of Job.far_mark

    def _yield_after(self, job: Job) -> None:
        """A job ends: if it was a far miss, prefetch starts nothing for
        `prefetch_yield` seconds more (the gate waits while any runs)."""
        if job.far:
            job.far = False
            self.far_reads -= 1
            until = time.monotonic() + self.cfg.prefetch_yield
            self.prefetch_yield_until = max(self.prefetch_yield_until, until)
            self.slots.changed.notify()

    def _miss_extent(self, ino: int, blocks: list[int]) -> int:
        """Bytes of source range a miss at `blocks` may take: `amplify`, or
        through the end of the file when at most `miss_tail` more is left."""
        amplify = self.cfg.amplify
        node = self.image.ns.inodes.get(ino)
        if not blocks or node is None or node.data is None:
            return amplify
        left = (node.data.count - blocks[0]) * BLOCK_SIZE
        return left if amplify < left <= amplify + self.cfg.miss_tail else amplify

    def _read_parts(self, data: list[int], hashes: list[int]):
        """Blocks reads wait for, in jobs of at most `request_max` bytes of
        blocks each: each is stored (and its readers woken) as soon as its
        own bytes are in, and none needs more of the budget than one request."""
        step = max(1, self.cfg.request_max // BLOCK_SIZE)
        if not data:
            yield [], hashes
        for k in range(0, len(data), step):
            yield data[k:k + step], hashes if k == 0 else []

    def _fail_stopped(self, keys) -> None:
        error = FetchFailed(self.info.get("offline") or "source changed")
        for key in keys:
            if key not in self.inflight:
                self.waits.fail(key, error)

    def _launch_readahead(self, ino: int, first: int, count: int) -> None:
        """Readahead's window [first, first + count) of a file (called from
        a read, on the trio thread)."""
        if self.stopped or self._nursery is None or self._completed:
            return
        step = self._readahead_step()
        if not self.info.get("base"):  # with a base, each job gets its hashes first (reuse.py)
            self._launch_window_hashes(ino, first, count, step)
        # one job per request: each is stored as soon as its bytes are in,
        # and reserves only its own bytes of the budget
        for start, stop in aligned_slices(first, first + count, step):
            job = self._plan(ino, range(start, stop), [], extend=0, prefetch=True)
            if job is not None:
                job.readahead = True
                self.stats["readahead_jobs"] += 1
                self._note_far(job)
                self._queue_job(job, READAHEAD)
                self._nursery.start_soon(self._run_job, job)

    def _readahead_step(self) -> int:
        """Blocks of one readahead job: `request_max`, in whole leaf groups
        when it holds one or more (the job then builds their leaf hash blocks)."""
        step = max(1, self.cfg.request_max // BLOCK_SIZE)
        per = merkle.HASHES_PER_BLOCK
        return step - step % per if step >= per else step

    def _launch_window_hashes(self, ino: int, first: int, count: int, step: int) -> None:
        """The hash blocks that verify a whole readahead window, in one job
        (they lie together in the source: one small request) ahead of its
        data jobs, which then wait for them instead of each asking for its
        own few KiB in a request of its own (a round trip apiece). Leaves
        whose data one data job fetches whole are left to it: it builds them."""
        node = self.image.ns.inodes.get(ino)
        if node is None or node.data is None:
            return
        stop = min(first + count, node.data.count)
        per = merkle.HASHES_PER_BLOCK  # data blocks one leaf hash block covers
        wants = self.planner.missing_deps(node, range(first - first % per, stop, per))
        if step % per == 0:
            wants = [w for w in wants if not leaf_within(node, w.index, first, stop)]
        if wants:
            job = Job(ino, wants, prefetch=True, readahead=True)
            self._claim(job, wants)
            self._queue_job(job, READAHEAD)
            self._nursery.start_soon(self._run_job, job)

    def _plan(self, ino: int, data_idx, hash_idx, *, extend: int, prefetch: bool) -> Job | None:
        """Claim what to fetch for blocks `data_idx`/`hash_idx` of a file
        (see Planner.plan); None when nothing is left to fetch. Prefetch and
        readahead jobs build the leaf hash blocks of the data they fetch
        whole (nobody waits on them, so storing by groups costs nothing)."""
        wants = self.planner.plan(ino, data_idx, hash_idx, extend, derive=prefetch)
        if not wants:
            return None
        job = Job(ino, wants, prefetch)
        self._claim(job, wants)
        return job

    def _claim(self, job: Job, wants: list[Want]) -> None:
        for w in wants:
            key = (job.ino, w.tree, w.index)
            self.inflight[key] = trio.Event()
            job.keys.add(key)

    def _release(self, job: Job, keys) -> None:
        """Let go of keys (stored, or given up): wake jobs waiting on them and
        hand blocks that reads still wait for to a new request."""
        again = []
        for key in list(keys):
            if key not in job.keys:
                continue
            job.keys.discard(key)
            event = self.inflight.pop(key, None)
            if event is not None:
                event.set()
            if key in self.waits.pending:
                again.append(key)
        if again and self._nursery is not None and not self._scope.cancel_called:
            self._dispatch(again)

    def _wanted(self, job: Job) -> bool:
        return any(key in self.waits.pending for key in job.keys)

    def _fail_waiters(self, job: Job, keys, error: Exception) -> None:
        failed = [key for key in keys if self.waits.fail(key, error)]
        if failed:
            log.warning("%d waiting read(s) of inode %d fail (first: %s block %d): %s",
                        len(failed), job.ino, "hash" if failed[0][1] == HASH else "data",
                        failed[0][2], error)
