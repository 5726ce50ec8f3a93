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

import errno
import logging
import os
import random
import shutil
import time
import zlib
from collections import defaultdict
from pathlib import Path

import trio

from .. import BLOCK_SIZE
from ..errors import CorruptImage, IntegrityError
from ..format.layout import SUPERBLOCK_SIZE, Superblock
from ..format.records import BlockKind, TreeKind, info_kind
from ..image import FillBlock, Image
from ..integrity import merkle
from ..space.plainfiles import plain_directory
from ..sources import (MirroredSource, ObjectChangedError, Source, SourceError,
                       TransientSourceError)
from .cache import image_complete
from .config import LoaderConfig
from .plan import DATA, HASH, Job, Key, Planner, Range, Want, parents_needed, plan_ranges
from .link import LinkEstimate
from .prefetch import PrefetchMixin, source_runs
from .remote import open_loader_source
from .reuse import ReuseMixin
from .schedule import (PREFETCH, READ, READAHEAD, Readahead, Slots, SourceOrder,
                       TokenBucket)

log = logging.getLogger("incfs.loader")


class FetchFailed(IntegrityError):
    """A block could not be fetched intact (it failed verification from
    every source tried, or the source refused it): the reads waiting for it
    fail with EIO."""

    errno = errno.EIO


def start_loader(config, service, nursery) -> "Loader":
    """Start the built-in loader for a mount's Service in `nursery`; the
    returned object's `aclose()` stops it and syncs the cache."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    loader = Loader(config, service)
    nursery.start_soon(loader.run)
    return loader


class Loader(PrefetchMixin, ReuseMixin):
    def __init__(self, config, service, settings: LoaderConfig | None = None):
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
                                   after=cfg.readahead_after, cap=lambda: 2 * self._depth())
        self.inflight: dict[Key, trio.Event] = {}
        self.planner = Planner(self.image, self.inflight.__contains__)
        self.source: Source | None = None
        self.base: Image | None = None
        self.base_index: dict[int, int] = {}
        self.info = dict(getattr(self.image, "cache_info", None) or {})
        self.prefetch_running = 0
        self.prefetch_pause_until = 0.0
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
                      "readahead_jobs": 0, "prefetch_blocks": 0, "prefetch_bytes": 0}
        self.last_error: str | None = None
        self.state = self.info.get("state", "starting")
        self.prefetch_state = "off" if cfg.prefetch == "none" else "waiting"
        self._cleaned = False
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
                self.source = open_loader_source(self.config)
                self.waits.read_hooks.append(self.readahead.note_read)
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._pending_loop)
                    nursery.start_soon(self._background)
                    nursery.start_soon(self._flusher)
                    nursery.start_soon(self._status_loop)
                    nursery.start_soon(self._warm_up)
                    nursery.start_soon(self._learn_order)
        except Exception:
            log.exception("loader stopped")
            self.state = "failed"
            self._update_status()
        finally:
            if self.readahead.note_read in self.waits.read_hooks:
                self.waits.read_hooks.remove(self.readahead.note_read)
            self._done.set()

    async def aclose(self) -> None:
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._done.wait()
            if self.image.fd >= 0 and self.image.appender is not None:
                await trio.to_thread.run_sync(os.fsync, self.image.fd)
            if self.source is not None:
                try:
                    await self.source.aclose()
                except Exception as e:  # closing must not fail the unmount
                    log.debug("closing source: %s", e)
            self._close_base()
            self._update_status()

    async def _warm_up(self) -> None:
        """Open a few connections now (reading the superblock on each), so
        the first misses do not pay for handshakes, and check on the way that
        the source still holds the image this cache is of."""
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
        """Index the source order of files for readahead across files."""
        runs = await trio.to_thread.run_sync(source_runs, self.image.source_maps)
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
        head = await self._timed(self.source.read(0, SUPERBLOCK_SIZE), SUPERBLOCK_SIZE)
        uuid = Superblock.decode(head).uuid
        if uuid != self.image.superblock.uuid:
            raise ObjectChangedError(f"{self.source.name} now holds another image "
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
        src = self.source
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
            "link": self.link.as_dict(2 * cfg.request_max, cfg.inflight_budget),
            "bandwidth": self.bucket.rate if self.bucket else None,
            "prefetch": {"mode": cfg.prefetch, "state": self.prefetch_state,
                         "blocks": self.stats["prefetch_blocks"],
                         "bytes": self.stats["prefetch_bytes"]},
            "base": self.info.get("base"),
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
                job = self._plan(ino, part, part_hashes, extend=self.cfg.amplify,
                                 prefetch=False)
                if job is not None:
                    self.stats["pending_jobs"] += 1
                    self._nursery.start_soon(self._run_job, job)

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
        if not self.info.get("base"):  # with a base, each job gets its hashes first (reuse.py)
            self._launch_window_hashes(ino, first, count)
        # one job per request: each is stored as soon as its bytes are in,
        # and reserves only its own bytes of the budget
        step = max(1, self.cfg.request_max // BLOCK_SIZE)
        for start in range(first, first + count, step):
            stop = min(first + count, start + step)
            job = self._plan(ino, range(start, stop), [], extend=0, prefetch=True)
            if job is not None:
                job.readahead = True
                self.stats["readahead_jobs"] += 1
                self._nursery.start_soon(self._run_job, job)

    def _launch_window_hashes(self, ino: int, first: int, count: int) -> None:
        """The hash blocks that verify a whole readahead window, in one job
        (they lie together in the source: one small request) ahead of its
        data jobs, which then wait for them instead of each asking for its
        own few KiB in a request of its own (a round trip apiece)."""
        node = self.image.ns.inodes.get(ino)
        if node is None or node.data is None:
            return
        stop = min(first + count, node.data.count)
        per = merkle.HASHES_PER_BLOCK  # data blocks one leaf hash block covers
        wants = self.planner.missing_deps(node, range(first - first % per, stop, per))
        if wants:
            job = Job(ino, wants, prefetch=True, readahead=True)
            self._claim(job, wants)
            self._nursery.start_soon(self._run_job, job)

    def _plan(self, ino: int, data_idx, hash_idx, *, extend: int, prefetch: bool) -> Job | None:
        """Claim what to fetch for blocks `data_idx`/`hash_idx` of a file
        (see Planner.plan); None when nothing is left to fetch."""
        wants = self.planner.plan(ino, data_idx, hash_idx, extend)
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

    # --- running a job ---------------------------------------------------------

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
            if self.stopped:
                self._fail_stopped_job(job)
            self._release(job, list(job.keys))
            self._update_status()
            if job.background:
                self.prefetch_running -= 1
                self.slots.changed.notify()

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
        if self.base is not None:
            wants = await self._hash_first(node, job, wants)
            # hash blocks another job is fetching (a window's hash job started
            # before the base was indexed) tell which data the base has too
            await self._wait_for_parents(node, DATA, [w.index for w in wants if w.tree == DATA],
                                         set(), job)
            wants = await self._reuse(node, job, wants)
        if not wants:
            return
        ranges = plan_ranges(wants, self._max_len(job), self.cfg.max_gap)
        got, bad = await self._fetch(job, ranges)
        zero = [(w, b"", None) for w in wants if not w.size]
        failed = await self._store(node, job, got + zero)
        failed.update(bad)
        if failed:
            await self._refetch(node, job, wants, failed)

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

    async def _fetch(self, job: Job, ranges: list[Range], avoid: set[int] | None = None):
        """Read ranges in parallel (one request slot each). Returns ([(want,
        stored bytes, origin mirror)], {(tree, index): origin} of blocks whose
        bytes fail their CRC). Raises the first SourceError."""
        got: list[tuple[Want, bytes, int | None]] = []
        bad: dict[tuple[int, int], int | None] = {}
        errors: list[BaseException] = []

        async def one(r: Range, cancel: trio.CancelScope) -> None:
            try:
                data, origin = await self._fetch_range(job, r, avoid)
            except Exception as e:
                errors.append(e)
                cancel.cancel()
                return
            self._check_crcs(r, data, origin, got, bad)

        async with trio.open_nursery() as nursery:
            for r in ranges:
                nursery.start_soon(one, r, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return got, bad

    async def _fetch_range(self, job: Job, r: Range, avoid):
        level = await self.slots.acquire(self._level(job), urgent=lambda: self._wanted(job),
                                         nbytes=r.length)
        try:
            data, origin = await self._timed(self._read(r.offset, r.length, avoid), r.length)
        finally:
            self.slots.release_slot(level, r.length)
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

    def _check_crcs(self, r: Range, data: bytes, origin, got, bad) -> None:
        for w in r.wants:
            start = w.offset - r.offset
            stored = data[start:start + w.size]
            if zlib.crc32(stored) != w.crc:
                # damaged on the way: never stored; fetched again
                bad[(w.tree, w.index)] = origin
                self.stats["crc_failures"] += 1
                self.image.counters["verify_failures"] += 1
            else:
                got.append((w, stored, origin))

    async def _read(self, offset: int, length: int, avoid: set[int] | None):
        src = self.source
        if isinstance(src, MirroredSource):
            if avoid and len(avoid) < len(src.mirrors):
                return await src.read_from_other(offset, length, sorted(avoid))
            return await src.read_with_origin(offset, length)
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
        return failed

    async def _fill(self, node, job: Job, tree: int, group) -> dict[tuple[int, int], int | None]:
        blocks = [FillBlock(w.index, b, w.kind, TreeKind(tree)) for w, b, _ in group]
        result = await self.service.fill(node.ino, blocks, fetched=True)
        errors = {index for index, _code, _why in result.errors}
        failed: dict[tuple[int, int], int | None] = {}
        stored, refused = [], 0
        for w, b, origin in group:
            if w.index in errors and not self._present(node, tree, w.index):
                failed[(tree, w.index)] = origin
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
