"""The built-in loader: mount a remote (or local) packed image through a local
cache image, fetching blocks on demand and in the background (R8, R9).

Two entry points, called by `mount`:

* `open_cache(config) -> Image` runs before the mount: it fetches the
  superblock and the metadata region `[0, meta_end)` of the source (one
  ranged request for most images) and writes the cache image: the same
  superblock with the CACHE flag, the metadata records at the same offsets
  (so their back links stay valid) with BLOCKS records re-typed as
  SOURCE_BLOCKS ("where this block is in the source"). The whole tree is
  visible as soon as the mount is up. An existing cache of the same image
  resumes; one of another image (an update) is kept beside the new cache as
  `CACHE.old` and its blocks are reused; if the source cannot be reached the
  mount is served from the cache alone ("offline" in status).

* `start_loader(config, service, nursery) -> Loader` runs the fetching:

  - pending reads first: each new pending read becomes a request at once.
    Its absent neighbours in the same file are added up to `amplify` bytes
    of source range (default 256 KiB), plus the hash-tree blocks that verify
    them, fetched in parallel ranges; at most `max_inflight` requests run at
    once (default 8); the sources layer retries with backoff, and this loader
    keeps retrying a block while a read still waits for it (so a network
    blip delays reads but never fails them; the read timeout decides).
  - blocks are stored as fetched (no recompression) through `Service.fill`,
    which verifies them against the signed Merkle tree first. A block that
    fails is fetched once more, from another mirror when there is one; if
    it fails again (or the source refuses it for good), the reads waiting for
    it fail with EIO instead of waiting forever.
  - background prefetch at lower priority: "none", "sequential" (data region
    order) or "profile:FILE" (those blocks first, then sequential), with an
    optional bandwidth cap. Prefetch never starts a request while a pending
    read's request waits for a slot.
  - updates: identical blocks (same SHA-256, which the new image's level-0
    hash blocks give without downloading data) are copied from the older
    image instead of fetched (`bytes_reused`).

Fetched blocks are not synced one batch at a time (the cache is
`durable=False`; a lost block is fetched again): the loader syncs every few
seconds and at close.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import BLOCK_SIZE
from .errors import CorruptImage, IncfsError, IntegrityError, UsageError
from .format.layout import (LOG_START, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, RecordHeader,
                            RecordType, Superblock, SuperFlags)
from .format.log import scan_log
from .format.records import BlockKind, TreeKind, info_kind, info_size
from .image import FillBlock, Image, MissingBlock
from .integrity import merkle
from .sources import (HttpSource, LocalSource, MirroredSource, RangeNotSatisfiableError,
                      RetryPolicy, S3Source, Source, SourceError, TransientSourceError,
                      open_source)

log = logging.getLogger("incfs.loader")

DEFAULT_AMPLIFY = 256 * 1024
DEFAULT_MAX_INFLIGHT = 8
FIRST_READ = 256 * 1024  # first metadata request: holds the whole metadata of most images
META_CHUNK = 4 * 1024 * 1024
PROBE_TIMEOUT = 5.0  # checking an existing cache against its source
PREFETCH_CHUNK = 512 * 1024
MAX_GAP = 32 * 1024  # absent bytes worth fetching to join two ranges into one request
FLUSH_INTERVAL = 3.0
STATUS_INTERVAL = 0.5
SWEEP_INTERVAL = 1.0
RETRY_CAP = 5.0  # seconds between loader-level retries of a waited-for block
DEP_WAIT = 60.0  # longest wait for a hash block another request is fetching
REUSE_BATCH = 1024

DATA = int(TreeKind.DATA)
HASH = int(TreeKind.HASH)
Key = tuple[int, int, int]  # (ino, tree, index), as in waits


class FetchFailed(IntegrityError):
    """A block could not be fetched intact (it failed verification from
    every source tried, or the source refused it): the reads waiting for it
    fail with EIO."""

    errno = errno.EIO


# --- the cache image ------------------------------------------------------------

def cache_path(config) -> Path:
    from .mount import default_cache

    return Path(config.cache) if config.cache else default_cache(config)


def old_path(path: Path) -> Path:
    """Where an older version's cache waits while a new version loads."""
    return path.with_name(path.name + ".old")


def check_prefetch(mode: str | None) -> None:
    """Raise UsageError unless `mode` is none, sequential or profile:FILE
    (with a readable FILE)."""
    mode = (mode or "none").strip()
    if mode in ("none", "sequential"):
        return
    if mode.startswith("profile:") and mode != "profile:":
        from .pack import load_profile

        load_profile(mode[len("profile:"):])  # raises UsageError when unusable
        return
    raise UsageError(f"--prefetch must be none, sequential or profile:FILE, not {mode!r}")


def open_cache(config) -> Image:
    """The cache image for a mount of `config.source` (see the module doc).
    Raises SourceError when there is no cache and the source cannot be read,
    UsageError when the source is not a packed image, the cache file is not
    an incfs cache or an option is wrong."""
    check_prefetch(config.prefetch)
    path = cache_path(config)
    return trio.run(_open_cache, config, path)


async def _open_cache(config, path: Path) -> Image:
    info = {"cache": str(path), "state": "created", "offline": None, "metadata_bytes": 0,
            "base": config.base_cache, "base_is_old": False}
    old = old_path(path)
    if path.exists():
        image = _open_existing(path)
        try:
            sb = await _probe(config)
        except (SourceError, CorruptImage) as e:
            info["state"] = "offline"
            info["offline"] = (f"source unreachable ({e}); serving from the cache"
                               if not image_complete(image) else
                               f"source unreachable ({e}); the cache is complete")
            log.warning("%s: %s", config.source, info["offline"])
            _attach(image, info, old)
            return image
        if sb.uuid == image.superblock.uuid:
            info["state"] = "resumed"
            _attach(image, info, old)
            return image
        # An update: the source holds another image. Fetch its metadata
        # before touching the old cache, so a failure leaves it as it was.
        image.close()
        sb, meta = await _fetch_metadata(config)
        os.replace(path, old)
        info["state"] = "updated"
    else:
        sb, meta = await _fetch_metadata(config)
    image = write_cache(path, sb, meta)
    info["metadata_bytes"] = len(meta)
    _attach(image, info, old)
    return image


def _attach(image: Image, info: dict, old: Path) -> None:
    """Cache images are not synced per fill (the loader syncs them); remember
    what open_cache found for the loader's status."""
    image.durable = False
    if not info["base"] and old.exists():
        info["base"] = str(old)
        info["base_is_old"] = True
    image.cache_info = info


def _open_existing(path: Path) -> Image:
    image = Image.open(path, writable=True)
    if not image.superblock.flags & SuperFlags.CACHE:
        image.close()
        raise UsageError(f"{path} exists and is not an incfs cache image")
    return image


def image_complete(image: Image) -> bool:
    totals = image.totals()
    return totals["blocks_present"] == totals["blocks_total"]


def write_cache(path: Path, sb: Superblock, meta: bytes) -> Image:
    """Create the cache image at `path` from a source's superblock and its
    metadata bytes `[0, meta_end)`; returns it opened for writing."""
    records = cache_metadata(meta, sb)
    flags = SuperFlags((int(sb.flags) & ~int(SuperFlags.PACKED)) | int(SuperFlags.CACHE))
    cache_sb = Superblock(uuid=sb.uuid, flags=flags, meta_end=sb.meta_end,
                          data_start=sb.data_start, data_end=sb.data_end,
                          packed_size=sb.packed_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            blob = cache_sb.encode() + records[SUPERBLOCK_SIZE:]
            if os.pwrite(fd, blob, 0) != len(blob):
                raise OSError(errno.EIO, f"short write to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    image = Image.open(path, writable=True)
    image.durable = False
    return image


def cache_metadata(meta: bytes, sb: Superblock) -> bytes:
    """The metadata region with every BLOCKS record re-typed SOURCE_BLOCKS.
    Every record must be whole and intact up to exactly `meta_end`: a cache
    never starts from damaged metadata."""
    if len(meta) < sb.meta_end:
        raise CorruptImage("metadata region is cut short")
    found: list[tuple[int, int]] = []

    def sink(offset: int, header: RecordHeader, body: bytes) -> None:
        if header.type == RecordType.BLOCKS:
            found.append((offset, header.length))

    result = scan_log(io.BytesIO(meta), sb.meta_end, sink)
    if result.end != sb.meta_end or result.dropped_reason:
        raise CorruptImage(f"source metadata is damaged ({result.dropped_reason or 'ends early'})")
    out = bytearray(meta[:sb.meta_end])
    for offset, length in found:
        out[offset:offset + length] = retype_record(out[offset:offset + length],
                                                    RecordType.SOURCE_BLOCKS)
    return bytes(out)


def retype_record(raw: bytes | bytearray, new_type: int) -> bytes:
    """The same record (header + body + payload/padding) with another type
    code: length, flags and the back link kept, the CRC recomputed."""
    header = RecordHeader.decode(bytes(raw[:RECORD_HEADER_SIZE]))
    if header is None:
        raise CorruptImage("not a record header")
    body = bytes(raw[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + header.body_len])
    if not RecordHeader.check(bytes(raw[:RECORD_HEADER_SIZE]), body):
        raise CorruptImage("record checksum mismatch")
    new = RecordHeader(int(new_type), header.flags, header.length, header.prev, header.body_len)
    return new.encode(body) + bytes(raw[RECORD_HEADER_SIZE:])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- sources ------------------------------------------------------------------------

def _backend_options(spec: str) -> frozenset[str]:
    if spec.startswith(("http://", "https://")):
        return HttpSource.OPTIONS
    if spec.startswith("s3://"):
        return S3Source.OPTIONS
    return LocalSource.OPTIONS


def open_loader_source(config, **extra) -> Source:
    """The source (or mirror set) of a mount: `config.source` then
    `config.mirrors`, with `config.source_options`; `extra` options are
    applied where a backend accepts them (used for short probes)."""
    specs = [config.source, *(config.mirrors or [])]
    options = dict(config.source_options or {})
    known = set().union(*(_backend_options(s) for s in specs))
    if len(specs) > 1:
        known |= {"cooldown", "retry", "expected_size", "mirror_retry"}
    for key, value in extra.items():
        if key in known:
            options[key] = value
    return open_source(specs if len(specs) > 1 else specs[0], **options)


async def _probe(config) -> Superblock:
    """The source's superblock, asked with short timeouts and few retries."""
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, max_delay=0.5, deadline=PROBE_TIMEOUT)
    source = open_loader_source(config, retry=policy, mirror_retry=policy,
                                connect_timeout=min(3.0, PROBE_TIMEOUT), timeout=PROBE_TIMEOUT)
    try:
        with trio.move_on_after(PROBE_TIMEOUT + 1) as scope:
            head = await source.read(0, SUPERBLOCK_SIZE)
        if scope.cancelled_caught:
            raise TransientSourceError(f"{source.name}: no answer within {PROBE_TIMEOUT:g}s")
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
    return Superblock.decode(head)


async def _fetch_metadata(config) -> tuple[Superblock, bytes]:
    source = open_loader_source(config)
    try:
        return await fetch_metadata(source)
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()


async def fetch_metadata(source: Source, first_read: int = FIRST_READ) -> tuple[Superblock, bytes]:
    """(superblock, bytes [0, meta_end)) of a packed image: one request when
    the metadata fits in `first_read` bytes, else parallel ones for the rest."""
    try:
        head = await source.read(0, first_read)
    except RangeNotSatisfiableError:
        size = await source.size()  # a small image: learnt from the refusal
        head = await source.read(0, min(size, first_read))
    sb = Superblock.decode(head[:SUPERBLOCK_SIZE])
    if not sb.flags & SuperFlags.PACKED or sb.meta_end <= LOG_START:
        raise UsageError(f"{source.name} is not a packed incfs image (made by `incfs pack`); "
                         "only packed images can be mounted from a source")
    if sb.meta_end > len(head):
        ranges = [(o, min(META_CHUNK, sb.meta_end - o))
                  for o in range(len(head), sb.meta_end, META_CHUNK)]
        head += b"".join(await source.read_many(ranges))
    return sb, head[:sb.meta_end]


# --- planning requests ----------------------------------------------------------------

@dataclass(slots=True)
class Want:
    """One block to get: where its stored bytes are in the source."""

    tree: int
    index: int
    offset: int
    size: int  # stored bytes; 0 for an all-zero block (nothing to fetch)
    kind: BlockKind
    crc: int


@dataclass(slots=True)
class Range:
    offset: int
    length: int
    wants: list[Want] = field(default_factory=list)


def plan_ranges(wants: list[Want], max_len: int, max_gap: int) -> list[Range]:
    """Cover the stored bytes of `wants` with few ranges: blocks are taken in
    source order and joined while the gap between them is at most `max_gap`
    bytes and the range stays within `max_len` bytes (a single block longer
    than that still gets its own range). Zero blocks need no bytes."""
    out: list[Range] = []
    for w in sorted((w for w in wants if w.size), key=lambda w: w.offset):
        if out:
            last = out[-1]
            end = last.offset + last.length
            new_end = max(end, w.offset + w.size)
            if w.offset - end <= max_gap and new_end - last.offset <= max_len:
                last.length = new_end - last.offset
                last.wants.append(w)
                continue
        out.append(Range(w.offset, w.size, [w]))
    return out


@dataclass
class Job:
    """Blocks of one file fetched and stored together."""

    ino: int
    wants: list[Want]
    prefetch: bool  # low priority; becomes False when a read starts waiting for it
    keys: set[Key] = field(default_factory=set)  # claimed (in flight), not yet released
    background: bool = False  # counted in Loader.prefetch_running

    @property
    def nbytes(self) -> int:
        return sum(w.size for w in self.wants)


class _Slots:
    """Request slots: pending reads take any free one; prefetch only when no
    pending request waits for one and fewer than `prefetch_max` prefetch
    requests run."""

    def __init__(self, total: int, prefetch_max: int):
        self.total, self.prefetch_max = total, prefetch_max
        self.busy = self.busy_prefetch = self.waiting = 0
        self.busy_pending = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _free(self, prefetch: bool) -> bool:
        if self.busy >= self.total:
            return False
        return not prefetch or (self.waiting == 0 and self.busy_prefetch < self.prefetch_max)

    async def acquire(self, prefetch: bool, urgent=None) -> bool:
        """Take a slot; returns the priority it was taken at (a prefetch
        request a read starts waiting for, `urgent()`, goes first too)."""
        if not prefetch:
            self.waiting += 1
        try:
            while not self._free(prefetch):
                if prefetch and urgent is not None and urgent():
                    prefetch = False
                    self.waiting += 1
                    continue
                with trio.move_on_after(0.25 if prefetch and urgent else 3600):
                    await self._changed.wait()
        finally:
            if not prefetch:
                self.waiting -= 1
        self.busy += 1
        if prefetch:
            self.busy_prefetch += 1
        else:
            self.busy_pending += 1
        return prefetch

    def release(self, prefetch: bool) -> None:
        self.busy -= 1
        if prefetch:
            self.busy_prefetch -= 1
        else:
            self.busy_pending -= 1
        self._notify()

    async def changed(self) -> None:
        await self._changed.wait()


class _TokenBucket:
    """Debt-style bucket: `take(n)` returns when n bytes fit in `rate` B/s."""

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

    async def wait(self) -> None:
        """Return once the debt is repaid."""
        self._refill()
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


# --- the loader ---------------------------------------------------------------------------

def start_loader(config, service, nursery) -> "Loader":
    """Start the built-in loader for a mount's Service in `nursery`; the
    returned object's `aclose()` stops it and syncs the cache."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    loader = Loader(config, service)
    nursery.start_soon(loader.run)
    return loader


class Loader:
    def __init__(self, config, service, *, prefetch_chunk: int = PREFETCH_CHUNK,
                 retry_cap: float = RETRY_CAP):
        self.config = config
        self.service = service
        self.image: Image = service.image
        self.waits = service.waits
        self.amplify = max(BLOCK_SIZE, int(getattr(config, "amplify", 0) or DEFAULT_AMPLIFY))
        self.max_inflight = max(1, int(getattr(config, "max_inflight", 0)
                                       or DEFAULT_MAX_INFLIGHT))
        self.prefetch_mode = (config.prefetch or "none").strip()
        self.prefetch_chunk = max(prefetch_chunk, self.amplify)
        self.prefetch_slots = max(1, self.max_inflight // 4)
        bandwidth = getattr(config, "bandwidth", None)
        self.bucket = _TokenBucket(bandwidth) if bandwidth else None
        self.retry_cap = retry_cap
        self.slots = _Slots(self.max_inflight, self.prefetch_slots)
        self.inflight: dict[Key, trio.Event] = {}
        self.source: Source | None = None
        self.base: Image | None = None
        self.base_index: dict[int, int] = {}
        self.info = dict(getattr(self.image, "cache_info", None) or {})
        self.prefetch_running = 0
        self.prefetch_pause_until = 0.0
        self.prefetch_backoff = 1.0
        self._prefetch_changed = trio.Event()
        self._stored_mark = -1
        self._complete_checked = 0.0
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._completed = False
        self._synced_end = -1
        self._last_sweep = 0.0
        self.stats = {"requests": 0, "bytes_transferred": 0, "errors": 0, "retries": 0,
                      "crc_failures": 0,
                      "refetches": 0, "blocks_failed": 0, "blocks_fetched": 0,
                      "blocks_reused": 0, "bytes_reused": 0, "pending_jobs": 0,
                      "prefetch_blocks": 0, "prefetch_bytes": 0}
        self.last_error: str | None = None
        self.state = self.info.get("state", "starting")
        self.prefetch_state = "off" if self.prefetch_mode == "none" else "waiting"
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
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._pending_loop)
                    nursery.start_soon(self._background)
                    nursery.start_soon(self._flusher)
                    nursery.start_soon(self._status_loop)
                    nursery.start_soon(self._warm_up)
        except Exception:
            log.exception("loader stopped")
            self.state = "failed"
            self._update_status()
        finally:
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
            if self.base is not None:
                self.base.close()
                self.base = None
            self._update_status()

    async def _warm_up(self) -> None:
        """Open a few connections now (reading the superblock on each), so
        the first misses do not pay for handshakes, and check on the way that
        the source still holds the image this cache is of."""
        async def one() -> None:
            head = await self.source.read(0, SUPERBLOCK_SIZE)
            sb = Superblock.decode(head)
            if sb.uuid != self.image.superblock.uuid:
                raise CorruptImage("the source now holds another image (an update): "
                                   "remount to switch to it")
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(4, self.max_inflight)):
                    nursery.start_soon(one)
            self._online()
        except* (SourceError, CorruptImage) as group:
            self._note_error(group.exceptions[0])

    async def _flusher(self) -> None:
        while True:
            await trio.sleep(FLUSH_INTERVAL)
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
            await trio.sleep(STATUS_INTERVAL)

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
        self.prefetch_state = "done" if self.prefetch_mode != "none" else "off"

    async def _on_complete(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._mark_complete()
        await self._sync()
        if self.base is not None and self.info.get("base_is_old"):
            self.base.close()
            self.base = None
        if self.info.get("base_is_old") and self.info.get("base"):
            Path(self.info["base"]).unlink(missing_ok=True)
            self.info["base"] = None
        self._update_status()

    # --- status ----------------------------------------------------------------

    def _online(self) -> None:
        if self.state in ("offline", "starting", "created", "resumed", "updated"):
            self.state = "online"
            self.info["offline"] = None

    def _note_error(self, error: BaseException) -> None:
        """A request failed for good (after the sources layer's retries)."""
        self.stats["errors"] += 1
        self.last_error = str(error)
        log.info("source error: %s", error)

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
        status = {
            "source": src.name if src is not None else self.config.source,
            "sources": sources,
            "state": self.state,
            "offline": self.info.get("offline"),
            "cache": self.info.get("cache"),
            "metadata_bytes": self.info.get("metadata_bytes", 0),
            "complete": self._completed,
            "inflight": self.slots.busy,
            "inflight_pending": self.slots.busy_pending,
            "inflight_prefetch": self.slots.busy_prefetch,
            "blocks_in_flight": len(self.inflight),
            "amplify": self.amplify,
            "max_inflight": self.max_inflight,
            "bandwidth": self.bucket.rate if self.bucket else None,
            "prefetch": {"mode": self.prefetch_mode, "state": self.prefetch_state,
                         "blocks": self.stats["prefetch_blocks"],
                         "bytes": self.stats["prefetch_bytes"]},
            "base": self.info.get("base"),
            "last_error": self.last_error,
            **{k: v for k, v in self.stats.items() if not k.startswith("prefetch_")},
        }
        self.service.loader_status.clear()
        self.service.loader_status.update(status)

    # --- pending reads ---------------------------------------------------------

    async def _pending_loop(self) -> None:
        serial = 0
        while True:
            found = await self.waits.next_pending(SWEEP_INTERVAL, serial)
            keys = [(pr.ino, pr.tree, pr.index) for pr in found]
            if found:
                serial = max(serial, found[-1].serial)
            now = time.monotonic()
            if not found or now - self._last_sweep >= SWEEP_INTERVAL:
                # anything waiting that no request covers (a request gave up)
                self._last_sweep = now
                keys.extend(self.waits.pending)
            self._dispatch(keys)

    def _dispatch(self, keys) -> None:
        by_ino: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for key in keys:
            ino, tree, index = key
            if key in self.inflight:
                continue
            by_ino[ino][1 if tree == HASH else 0].append(index)
        for ino, (data, hashes) in by_ino.items():
            job = self._plan(ino, data, hashes, extend=True, prefetch=False)
            if job is not None:
                self.stats["pending_jobs"] += 1
                self._nursery.start_soon(self._run_job, job)

    def _plan(self, ino: int, data_idx, hash_idx, *, extend: bool, prefetch: bool) -> Job | None:
        """Claim what to fetch for blocks `data_idx`/`hash_idx` of a file:
        those absent and not already in flight, absent neighbours up to the
        amplification bound (with `extend`) and the hash blocks that verify
        them."""
        node = self.image.ns.inodes.get(ino)
        maps = self.image.source_maps.get(ino)
        if node is None or node.data is None or maps is None:
            return None
        dmap, hmap = maps

        def take(tree: int, i: int) -> Want | None:
            target, smap = (node.data, dmap) if tree == DATA else (node.hashes, hmap)
            if target is None or smap is None or not 0 <= i < target.count:
                return None
            if target.is_present(i) or (ino, tree, i) in self.inflight:
                return None
            loc = smap.get(i)
            if loc is None:
                return None
            offset, info, crc = loc
            kind = info_kind(info)
            return Want(tree, i, offset, 0 if kind is BlockKind.ZERO else info_size(info),
                        kind, crc)

        mandatory = sorted(set(data_idx))
        must = set(mandatory)
        selected: dict[int, Want] = {}
        group_start = last_end = None
        last_index = -2
        for i in mandatory:
            if i in selected:
                continue
            w = take(DATA, i)
            if w is None:
                continue
            if last_index != i - 1:
                group_start = last_end = None
            if w.size:
                if last_end is not None and not last_end <= w.offset <= last_end + BLOCK_SIZE:
                    group_start = None
                if group_start is None:
                    group_start = w.offset
                last_end = w.offset + w.size
            selected[i] = w
            last_index = i
            if not extend or i + 1 in must:
                continue
            j, added = i + 1, 0
            while j < node.data.count and added < self.amplify // 512:
                w2 = take(DATA, j)
                if w2 is None:
                    break
                if w2.size:
                    if group_start is None:
                        group_start = last_end = w2.offset
                    if not last_end <= w2.offset <= last_end + BLOCK_SIZE:
                        break
                    if w2.offset + w2.size - group_start > self.amplify:
                        break
                    last_end = w2.offset + w2.size
                selected[j] = w2
                last_index = j
                j += 1
                added += 1
        hashes: dict[int, Want] = {}
        for s in set(hash_idx):
            w = take(HASH, s)
            if w is not None:
                hashes[s] = w
        if node.has_tree and node.hashes is not None and node.hashes.present < node.hashes.count:
            for rep in sorted({i // merkle.HASHES_PER_BLOCK for i in selected}):
                for s in merkle.required_hash_blocks(node.geometry,
                                                     rep * merkle.HASHES_PER_BLOCK):
                    if s not in hashes:
                        w = take(HASH, s)
                        if w is not None:
                            hashes[s] = w
        wants = list(hashes.values()) + list(selected.values())
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
            while True:
                try:
                    await self._attempt(job)
                    return
                except TransientSourceError as e:
                    self._note_error(e)
                    if not self._wanted(job):
                        # nobody waits: prefetch comes back to these blocks later
                        if job.background:
                            self.prefetch_pause_until = time.monotonic() + self.prefetch_backoff
                            self.prefetch_backoff = min(self.prefetch_backoff * 2, 30.0)
                        return
                    job.prefetch = False  # a read waits for it now
                    self.stats["retries"] += 1
                    await trio.sleep(random.uniform(delay / 2, delay))
                    delay = min(delay * 2, self.retry_cap)
                except SourceError as e:  # permanent: retrying the same request cannot help
                    self._note_error(e)
                    self._fail_waiters(job, list(job.keys),
                                       FetchFailed(f"cannot fetch from the source: {e}"))
                    if job.background:
                        self.prefetch_pause_until = time.monotonic() + 30.0
                    return
                except Exception as e:  # e.g. the cache's disk is full: fail, keep going
                    log.exception("storing fetched blocks of inode %d failed", job.ino)
                    self.stats["errors"] += 1
                    self.last_error = f"cannot store fetched blocks: {e}"
                    self._fail_waiters(job, list(job.keys),
                                       FetchFailed(f"cannot store fetched blocks: {e}"))
                    if job.background:
                        self.prefetch_pause_until = time.monotonic() + 30.0
                    return
        finally:
            self._release(job, list(job.keys))
            self._update_status()
            if job.background:
                self.prefetch_running -= 1
                self._prefetch_changed.set()
                self._prefetch_changed = trio.Event()

    async def _attempt(self, job: Job) -> None:
        node = self.image.ns.inodes[job.ino]
        wants = [w for w in job.wants if (job.ino, w.tree, w.index) in job.keys
                 and not self._present(node, w.tree, w.index)]
        if self.base is not None:
            wants = await self._hash_first(node, job, wants)
            wants = await self._reuse(node, job, wants)
        if not wants:
            return
        max_len = self.prefetch_chunk if job.prefetch else self.amplify
        ranges = plan_ranges(wants, max_len, MAX_GAP)
        got, bad = await self._fetch(ranges, job.prefetch, urgent=lambda: self._wanted(job))
        zero = [(w, b"", None) for w in wants if not w.size]
        failed = await self._store(node, job, got + zero)
        failed.update(bad)
        if not failed:
            return
        # Fetch what failed (and hash blocks it still lacks) once more, from
        # another mirror when the source has one.
        self.stats["refetches"] += 1
        retry: dict[tuple[int, int], Want] = {}
        avoid: set[int] = set()
        for (tree, index), origin in failed.items():
            w = next((w for w in wants if w.tree == tree and w.index == index), None)
            if w is not None and w.size:
                retry[(tree, index)] = w
            if origin is not None:
                avoid.add(origin)
        for w in self._missing_deps(node, [i for (t, i) in failed if t == DATA], job):
            retry[(w.tree, w.index)] = w
        got2, bad2 = await self._fetch(plan_ranges(list(retry.values()), self.amplify, 0),
                                       job.prefetch, avoid=avoid,
                                       urgent=lambda: self._wanted(job))
        still = await self._store(node, job, got2)
        still.update(bad2)
        for (tree, index) in failed:
            if (tree, index) not in retry and not self._present(node, tree, index):
                still[(tree, index)] = None  # e.g. a zero block that does not verify
        lost = [(job.ino, t, i) for (t, i) in still if not self._present(node, t, i)]
        if lost:
            self.stats["blocks_failed"] += len(lost)
            self._fail_waiters(job, lost, FetchFailed(
                f"inode {job.ino}: {len(lost)} block(s) failed verification from every "
                "source tried"))

    async def _hash_first(self, node, job: Job, wants: list[Want]) -> list[Want]:
        """With an older image to copy from, get the hash blocks first: they
        tell which data blocks the older image already has. (One more round
        trip for a miss, against not downloading reusable data.)"""
        hashes = [w for w in wants if w.tree == HASH]
        if not hashes or not any(w.tree == DATA and w.size for w in wants):
            return wants
        max_len = self.prefetch_chunk if job.prefetch else self.amplify
        got, _bad = await self._fetch(plan_ranges(hashes, max_len, MAX_GAP), job.prefetch,
                                      urgent=lambda: self._wanted(job))
        await self._store(node, job, got)
        # whatever failed stays absent and claimed: fetched again with the rest
        return [w for w in wants if not self._present(node, w.tree, w.index)]

    def _present(self, node, tree: int, index: int) -> bool:
        target = node.data if tree == DATA else node.hashes
        return target is not None and target.is_present(index)

    def _missing_deps(self, node, data_indexes: list[int], job: Job) -> list[Want]:
        """Hash blocks that data blocks need, absent and in flight nowhere:
        claimed for `job`."""
        if not node.has_tree or node.hashes is None:
            return []
        maps = self.image.source_maps.get(node.ino)
        out = []
        need = set()
        for i in data_indexes:
            need.update(merkle.required_hash_blocks(node.geometry, i))
        for s in sorted(need):
            key = (node.ino, HASH, s)
            if node.hashes.is_present(s) or key in self.inflight or maps is None or maps[1] is None:
                continue
            loc = maps[1].get(s)
            if loc is None:
                continue
            offset, info, crc = loc
            kind = info_kind(info)
            out.append(Want(HASH, s, offset, 0 if kind is BlockKind.ZERO else info_size(info),
                            kind, crc))
        self._claim(job, out)
        job.wants.extend(out)
        return out

    async def _fetch(self, ranges: list[Range], prefetch: bool, avoid: set[int] | None = None,
                     urgent=None):
        """Read ranges in parallel (one request slot each). Returns ([(want,
        stored bytes, origin mirror)], {(tree, index): origin} of blocks whose
        bytes fail their CRC). Raises the first SourceError."""
        got: list[tuple[Want, bytes, int | None]] = []
        bad: dict[tuple[int, int], int | None] = {}
        errors: list[BaseException] = []

        async def one(r: Range, cancel: trio.CancelScope) -> None:
            try:
                kind = await self.slots.acquire(prefetch, urgent)
                try:
                    if kind and self.bucket is not None:
                        self.bucket.charge(r.length)
                    data, origin = await self._read(r.offset, r.length, avoid)
                finally:
                    self.slots.release(kind)
            except Exception as e:
                errors.append(e)
                cancel.cancel()
                return
            self.stats["requests"] += 1
            self.stats["bytes_transferred"] += len(data)
            self.prefetch_backoff = 1.0
            self._online()
            for w in r.wants:
                start = w.offset - r.offset
                stored = data[start:start + w.size]
                if zlib.crc32(stored) != w.crc:
                    # damaged on the way: never stored; fetched again below
                    bad[(w.tree, w.index)] = origin
                    self.stats["crc_failures"] += 1
                    self.image.counters["verify_failures"] += 1
                else:
                    got.append((w, stored, origin))

        async with trio.open_nursery() as nursery:
            for r in ranges:
                nursery.start_soon(one, r, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return got, bad

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
            if not group:
                continue
            await self._wait_for_parents(node, tree, [w.index for w, _, _ in group], mine, job)
            blocks = [FillBlock(w.index, b, w.kind, TreeKind(tree)) for w, b, _ in group]
            result = await self.service.fill(node.ino, blocks, fetched=True)
            errors = {index: code for index, code, _why in result.errors}
            stored = []
            for w, b, origin in group:
                key = (node.ino, tree, w.index)
                if w.index in errors and not self._present(node, tree, w.index):
                    failed[(tree, w.index)] = origin
                else:
                    stored.append(key)
                    self.stats["blocks_fetched"] += 1
                    if job.background:
                        self.stats["prefetch_blocks"] += 1
                        self.stats["prefetch_bytes"] += len(b)
            self._release(job, stored)
        return failed

    async def _wait_for_parents(self, node, tree: int, indexes: list[int], mine, job) -> None:
        """Wait (bounded) for hash blocks these blocks are verified with when
        another request is fetching them right now."""
        if not node.has_tree or node.hashes is None:
            return
        geo = node.geometry
        need: set[int] = set()
        if tree == DATA:
            for rep in {i // merkle.HASHES_PER_BLOCK for i in indexes}:
                need.update(merkle.required_hash_blocks(geo, rep * merkle.HASHES_PER_BLOCK))
        else:
            for s in indexes:
                level, index = geo.level_of(s)
                while level + 1 < geo.levels:
                    parent, _ = geo.locate(level, index)
                    need.add(parent)
                    level, index = level + 1, index // merkle.HASHES_PER_BLOCK
        events = [self.inflight[(node.ino, HASH, s)] for s in need
                  if (HASH, s) not in mine and not node.hashes.is_present(s)
                  and (node.ino, HASH, s) in self.inflight
                  and (node.ino, HASH, s) not in job.keys]
        if not events:
            return
        with trio.move_on_after(DEP_WAIT):
            for event in events:
                await event.wait()

    # --- reuse (updates, R9) ------------------------------------------------------

    async def _open_base(self) -> None:
        path = self.info.get("base") or getattr(self.config, "base_cache", None)
        if not path or not Path(path).exists():
            return
        try:
            base = await trio.to_thread.run_sync(lambda: Image.open(path))
        except (IncfsError, OSError) as e:
            log.warning("cannot use %s as a base: %s", path, e)
            self.info["base"] = None
            return
        self.info["base"] = str(path)
        self.prefetch_state = "indexing base"
        self.base_index = await trio.to_thread.run_sync(index_blocks, base)
        self.base = base

    async def _reuse(self, node, job: Job, wants: list[Want]) -> list[Want]:
        """Copy data blocks whose hash (known from present level-0 hash
        blocks) matches a block of the base image; returns the rest."""
        candidates = [w for w in wants if w.tree == DATA and w.size]
        if not candidates or self.base is None:
            return wants
        hits = await trio.to_thread.run_sync(self._reuse_lookup, node, candidates)
        if not hits:
            return wants
        blocks = [blk for _, blk in hits]
        result = await self.service.fill(node.ino, blocks, reused=True)
        errors = {index for index, _code, _why in result.errors}
        done = set()
        stored_keys = []
        for w, blk in hits:
            if w.index not in errors and self._present(node, DATA, w.index):
                done.add(w.index)
                stored_keys.append((node.ino, DATA, w.index))
                self.stats["blocks_reused"] += 1
                self.stats["bytes_reused"] += len(blk.data)
        self._release(job, stored_keys)
        return [w for w in wants if not (w.tree == DATA and w.index in done)]

    def _reuse_lookup(self, node, wants: list[Want]) -> list[tuple[Want, FillBlock]]:
        out = []
        with self.service.image_lock:
            for w in wants:
                digest = leaf_digest(self.image, node, w.index)
                if digest is None:
                    continue
                hit = self.base_index.get(int.from_bytes(digest[:8], "little"))
                if hit is None:
                    continue
                offset, info = hit >> 16, hit & 0xFFFF
                try:
                    stored = os.pread(self.base.fd, info_size(info), offset)
                except OSError:
                    continue
                out.append((w, FillBlock(w.index, stored, info_kind(info), TreeKind.DATA)))
        return out

    async def _reuse_pass(self) -> None:
        """Get every hash block, then copy every data block the base has."""
        self.prefetch_state = "hash blocks"
        await self._prefetch_runs(tree_filter=HASH)
        await self._prefetch_idle()
        self.prefetch_state = "reusing"
        for ino in list(self.image.source_maps):
            node = self.image.ns.inodes.get(ino)
            if node is None or node.data is None or node.data.complete:
                continue
            absent = node.data.missing(0, node.data.count)
            for i in range(0, len(absent), REUSE_BATCH):
                job = self._plan(ino, absent[i:i + REUSE_BATCH], [], extend=False, prefetch=False)
                if job is None:
                    continue
                try:
                    await self._reuse(node, job, [w for w in job.wants if w.tree == DATA])
                finally:
                    self._release(job, list(job.keys))

    # --- background prefetch -------------------------------------------------------

    async def _background(self) -> None:
        self.prefetch_pause_until = 0.0
        await self._open_base()
        if self.base is not None and self.prefetch_mode != "none":
            await self._reuse_pass()
        if self.prefetch_mode == "none":
            self.prefetch_state = "off"
            return
        if self.prefetch_mode.startswith("profile:"):
            self.prefetch_state = "profile"
            await self._prefetch_profile(self.prefetch_mode[len("profile:"):])
        pause = 1.0
        while not image_complete(self.image):
            self.prefetch_state = "sequential"
            before = self.image.totals()["blocks_present"]
            await self._prefetch_runs()
            await self._prefetch_idle()
            if image_complete(self.image):
                break
            # something failed or is still fetched by a read: try again later
            self.prefetch_state = "retrying"
            progressed = self.image.totals()["blocks_present"] > before
            await trio.sleep(0.2 if progressed else pause)
            pause = 1.0 if progressed else min(pause * 2, 30.0)
        await self._on_complete()

    async def _prefetch_profile(self, path: str) -> None:
        from .profile import resolve

        try:
            entries = await trio.to_thread.run_sync(resolve, self.image, path)
        except (IncfsError, OSError) as e:
            log.warning("profile %s not used: %s", path, e)
            self.last_error = f"profile {path}: {e}"
            return
        per_job = max(1, self.prefetch_chunk // BLOCK_SIZE)
        for start in range(0, len(entries), per_job):
            by_ino: dict[int, list[int]] = {}
            for ino, index in entries[start:start + per_job]:
                by_ino.setdefault(ino, []).append(index)
            for ino, indexes in by_ino.items():
                await self._prefetch_gate()
                job = self._plan(ino, indexes, [], extend=False, prefetch=True)
                if job is not None:
                    self._launch_prefetch(job)

    async def _prefetch_runs(self, tree_filter: int | None = None) -> None:
        """Fetch absent blocks in source order (the data region as packed:
        hash trees first, then profiled blocks, then the rest).

        Jobs gather blocks across consecutive runs of the same file: packing
        deduplicates identical blocks, so a file's map can break into many
        one-block runs whose bytes lie elsewhere; `plan_ranges` then joins
        them by offset instead of sending one request per block."""
        runs = await trio.to_thread.run_sync(source_runs, self.image.source_maps)
        batch = _PrefetchBatch(self.prefetch_chunk)
        for _offset, ino, tree, first, count in runs:
            if tree_filter is not None and tree != tree_filter:
                continue
            node = self.image.ns.inodes.get(ino)
            if node is None or node.data is None:
                continue
            target = node.data if tree == DATA else node.hashes
            smap = self.image.source_maps[ino][0 if tree == DATA else 1]
            if target is None or smap is None:
                continue
            for i in range(first, first + count):
                if batch.full_or_other(ino, tree):
                    await self._launch_batch(batch)
                if not target.is_present(i) and (ino, tree, i) not in self.inflight:
                    loc = smap.get(i)
                    batch.add(ino, tree, i, info_size(loc[1]) if loc else 0)
        await self._launch_batch(batch)

    async def _launch_batch(self, batch: "_PrefetchBatch") -> None:
        ino, tree, indexes = batch.take()
        if not indexes:
            return
        await self._prefetch_gate()
        if tree == DATA:
            job = self._plan(ino, indexes, [], extend=False, prefetch=True)
        else:
            job = self._plan(ino, [], indexes, extend=False, prefetch=True)
        if job is not None:
            self._launch_prefetch(job)

    async def _prefetch_gate(self) -> None:
        """Wait until prefetch may start a job: fewer than `prefetch_slots`
        prefetch jobs running, no read's request running or waiting for a
        slot, no pause after errors, and the bandwidth cap's debt repaid.
        Blocks are claimed only after this, so a read never waits behind a
        prefetch job that has not started."""
        await trio.lowlevel.checkpoint()
        while True:
            pause = self.prefetch_pause_until - time.monotonic()
            if pause > 0:
                await trio.sleep(pause)
                continue
            if self.bucket is not None and self.bucket.tokens < 0:
                await self.bucket.wait()
                continue
            if self.prefetch_running < self.prefetch_slots and self.slots.waiting == 0 \
                    and self.slots.busy_pending == 0:
                return
            with trio.move_on_after(0.5):
                await self._wait_prefetch_change()

    def _launch_prefetch(self, job: Job) -> None:
        job.background = True
        self.prefetch_running += 1
        self._nursery.start_soon(self._run_job, job)

    async def _wait_prefetch_change(self) -> None:
        async with trio.open_nursery() as nursery:
            async def first(fn):
                await fn()
                nursery.cancel_scope.cancel()
            nursery.start_soon(first, self._prefetch_changed.wait)
            nursery.start_soon(first, self.slots.changed)

    async def _prefetch_idle(self) -> None:
        while self.prefetch_running:
            await self._prefetch_changed.wait()


class _PrefetchBatch:
    """Blocks of one file (and tree) gathered for one prefetch job."""

    def __init__(self, max_bytes: int, max_blocks: int = 4096):
        self.max_bytes, self.max_blocks = max_bytes, max_blocks
        self.key: tuple[int, int] | None = None
        self.indexes: list[int] = []
        self.nbytes = 0

    def full_or_other(self, ino: int, tree: int) -> bool:
        if not self.indexes:
            self.key = (ino, tree)
            return False
        return (self.key != (ino, tree) or self.nbytes >= self.max_bytes
                or len(self.indexes) >= self.max_blocks)

    def add(self, ino: int, tree: int, index: int, nbytes: int) -> None:
        self.key = (ino, tree)
        self.indexes.append(index)
        self.nbytes += nbytes

    def take(self) -> tuple[int, int, list[int]]:
        ino, tree = self.key or (0, 0)
        indexes, self.indexes, self.nbytes = self.indexes, [], 0
        return ino, tree, indexes


# --- helpers on images -------------------------------------------------------------------

def leaf_digest(image: Image, node, index: int) -> bytes | None:
    """SHA-256 a data block must have, from the file's verified level-0 hash
    block (None when that is absent or bad)."""
    if not node.has_tree:
        return None
    geo = node.geometry
    if geo.levels == 0:
        return node.root_hash
    storage, offset = geo.locate(-1, index)
    try:
        block = image.hash_block(node, storage)
    except (IntegrityError, MissingBlock, OSError, CorruptImage):
        return None
    if block is None:
        return None
    return bytes(block[offset:offset + merkle.HASH_SIZE])


def index_blocks(image: Image) -> dict[int, int]:
    """Present data blocks of an image by content: first 8 bytes of their
    SHA-256 -> (offset << 16 | info) of the stored bytes. The hash comes from
    the image's level-0 hash blocks where present, else from the block.
    (Collisions only cost a failed fill: every copied block is verified.)"""
    index: dict[int, int] = {}
    for node in list(image.ns.inodes.values()):
        if node.data is None or not node.data.present:
            continue
        for i, offset, info, crc in node.data.entries():
            if info_kind(info) is BlockKind.ZERO:
                continue
            digest = leaf_digest(image, node, i)
            if digest is None:
                size = min(BLOCK_SIZE, node.size - i * BLOCK_SIZE)
                try:
                    plain = image._load(node, TreeKind.DATA, i, (offset, info, crc), size)
                except (IntegrityError, OSError, CorruptImage):
                    continue
                digest = merkle.hash_block(plain)
            index.setdefault(int.from_bytes(digest[:8], "little"), offset << 16 | info)
    return index


def source_runs(source_maps) -> list[tuple[int, int, int, int, int]]:
    """(source offset, ino, tree, first index, count) of runs of blocks that
    lie one after another in the source, sorted by offset."""
    runs = []
    for ino, maps in source_maps.items():
        for tree, smap in ((DATA, maps[0]), (HASH, maps[1])):
            if smap is None:
                continue
            start = first = prev = None
            end = 0
            for i, offset, info, _crc in smap.entries():
                size = 0 if info_kind(info) is BlockKind.ZERO else info_size(info)
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
            if first is not None:
                runs.append((start or 0, ino, tree, first, prev - first + 1))
    runs.sort()
    return runs


__all__ = ["open_cache", "start_loader", "Loader", "FetchFailed", "retype_record",
           "cache_metadata", "write_cache", "fetch_metadata", "plan_ranges", "Want", "Range",
           "index_blocks", "source_runs", "open_loader_source"]
