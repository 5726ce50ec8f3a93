"""The cache image of a mount from a source: created from the source's
metadata, resumed, or kept as the base of an update (R8, R9).

`await open_cache(config) -> (Image, Source | None)` runs before the mount:
it fetches the superblock and the metadata region `[0, meta_end)` of the
source (one ranged request for most images) and writes the cache image: the same superblock
with the CACHE flag, the metadata records at the same offsets (so their back
links stay valid) with BLOCKS records re-typed as SOURCE_BLOCKS ("where this
block is in the source"). The whole tree is visible as soon as the mount is
up. An existing cache of the same image resumes; one of another image (an
update) is kept beside the new cache as `CACHE.old` and its blocks are
reused; if the source cannot be reached the mount is served from the cache
alone ("offline" in status).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import CorruptImage, UsageError
from ..format.layout import (LOG_START, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, RecordHeader,
                             RecordType, Superblock, SuperFlags)
from ..format.log import scan_log
from ..space.plainfiles import plain_directory
from ..sources import (RangeNotSatisfiableError, RetryPolicy, Source, SourceError,
                       TransientSourceError)
from .cachefile import cache_path
from .config import DEFAULTS, LoaderConfig, check_prefetch
from .early import EarlyReader, EarlyRefused
from .ondemand import SourceOnDemand, both
from .remote import open_loader_source, preload_aside

if TYPE_CHECKING:  # imported when a cache is opened: a mount's metadata request goes first
    from ..image import Image

log = logging.getLogger("incfs.loader")


def old_path(path: Path) -> Path:
    """Where an older version's cache waits while a new version loads."""
    return path.with_name(path.name + ".old")


async def open_cache(config) -> tuple[Image, Source | None]:
    """The cache image for a mount of `config.source` (see the module doc),
    and, when its metadata was just fetched, the source it came from: that
    one's connections are open, so the loader's first fetches (taking it
    over) pay no handshake. Raises SourceError when there is no cache and
    the source cannot be read, UsageError when the source is not a packed
    image, the cache file is not an incfs cache or an option is wrong."""
    check_prefetch(config.prefetch)
    settings = LoaderConfig.from_mount(config)
    path = cache_path(config)
    info = {"cache": str(path), "state": "created", "offline": None, "metadata_bytes": 0,
            "base": config.base_cache, "base_is_old": False}
    old = old_path(path)
    if path.exists():
        image = _open_existing(path)
        try:
            sb = await _probe(config, settings.probe_timeout)
        except (SourceError, CorruptImage) as e:
            info["state"] = "offline"
            info["offline"] = (f"source unreachable ({e}); serving from the cache"
                               if not image_complete(image) else
                               f"source unreachable ({e}); the cache is complete")
            log.warning("%s: %s", config.source, info["offline"])
            _attach(image, info, old)
            return image, None
        if sb.uuid == image.superblock.uuid:
            info["state"] = "resumed"
            _attach(image, info, old)
            return image, None
        # An update: the source holds another image. Its metadata is fetched
        # before the old cache is touched, so a failure leaves that as it was.
        image.close()
        info["state"] = "updated"
    early = EarlyReader.take(config, settings.first_read)
    if early is not None:  # waiting for its answer: import the client meanwhile
        early.on_wait = functools.partial(preload_aside, config)
    source = SourceOnDemand(config, early)
    try:
        if early is not None:
            sb, meta = await fetch_metadata(source, settings.first_read, settings.meta_chunk,
                                            early)
        else:
            sb, meta = await _fetch_warming(await source.get(), settings)
        if info["state"] == "updated":
            os.replace(path, old)
            move_plain_copies(path, old)
        image = write_cache(path, sb, meta)
    except BaseException:
        if early is not None:
            early.drop_rest()
        with trio.CancelScope(shield=True):
            await source.aclose()
        raise
    info["metadata_bytes"] = len(meta)
    if early is not None and early.rest_pending:
        # the answer goes on past the metadata with the blocks `pack` lays
        # first (hash trees): already on the wire, the loader stores them
        # (incfs.loader.tail) and the connection is reused, not closed
        info["first_rest"] = early
    if source.opened is None and early is not None:
        # read without the HTTP client: the loader opens the source later,
        # and takes what this answer said of the object as first seen
        info["identity"] = early.identity
    _attach(image, info, old)
    return image, source.opened


async def _fetch_warming(source: Source, settings: LoaderConfig) -> tuple[Superblock, bytes]:
    """fetch_metadata, while `warm_connections - 1` more connections open
    beside the one it uses (each reads the superblock). The loader takes the
    source over with all of them idle: a mount's first read wants a data
    range and a hash-tree range at once, and neither then pays a handshake.
    The warm-ups stop when the metadata is in; one that fails is no failure."""
    got: list[tuple[Superblock, bytes]] = []

    async def fetch() -> None:
        got.append(await fetch_metadata(source, settings.first_read, settings.meta_chunk))
        nursery.cancel_scope.cancel()

    async def warm() -> None:
        with contextlib.suppress(SourceError, CorruptImage):
            await source.read(0, SUPERBLOCK_SIZE)

    # connections opened before the daemon started need no warming
    # (incfs.preconnect): asking for a superblock on them only costs link time
    warmups = 0 if getattr(source, "preconnected", 0) else settings.warm_connections - 1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            for _ in range(warmups):
                nursery.start_soon(warm)
    except BaseExceptionGroup as group:  # fetch's own error: the warm-ups keep theirs
        raise group.exceptions[0] from None
    return got[0]


def move_plain_copies(path: Path, old: Path) -> None:
    """The plain copies a cache's released blocks live in follow it to its
    new name (incfs.space): the old version's blocks stay reusable."""
    src, dst = plain_directory(path), plain_directory(old)
    if src.exists():
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)


def _attach(image: Image, info: dict, old: Path) -> None:
    """Cache images are not synced per fill (the loader syncs them); remember
    what open_cache found for the loader's status."""
    image.durable = False
    if not info["base"] and old.exists():
        info["base"] = str(old)
        info["base_is_old"] = True
    image.cache_info = info


def _open_existing(path: Path) -> Image:
    from ..image import Image

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
    from ..image import Image

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


async def _probe(config, timeout: float) -> Superblock:
    """The source's superblock, asked with short timeouts and few retries."""
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, max_delay=0.5, deadline=timeout)
    source = open_loader_source(config, retry=policy, mirror_retry=policy,
                                connect_timeout=min(3.0, timeout), timeout=timeout)
    try:
        with trio.move_on_after(timeout + 1) as scope:
            head = await source.read(0, SUPERBLOCK_SIZE)
        if scope.cancelled_caught:
            raise TransientSourceError(f"{source.name}: no answer within {timeout:g}s")
    finally:
        with trio.CancelScope(shield=True):
            await source.aclose()
    return Superblock.decode(head)


def _metadata_end(head: bytes) -> int | None:
    """How much of an image's head is its metadata, once its superblock is
    in (a damaged one says nothing: the whole first read is taken, and the
    superblock's own check then refuses it)."""
    if len(head) < SUPERBLOCK_SIZE:
        return None
    try:
        return max(SUPERBLOCK_SIZE, Superblock.decode(head[:SUPERBLOCK_SIZE]).meta_end)
    except CorruptImage:
        return 1 << 62


async def fetch_metadata(source: Source | SourceOnDemand, first_read: int = DEFAULTS.first_read,
                         meta_chunk: int = DEFAULTS.meta_chunk,
                         early: EarlyReader | None = None) -> tuple[Superblock, bytes]:
    """(superblock, bytes [0, meta_end)) of a packed image: one request when
    the metadata fits in `first_read` bytes; else the rest in parallel
    chunks, asked for as soon as the superblock has come in (a streaming
    source), while the first response is still arriving. With `early`, the
    first request's answer is read there (see incfs.loader.early); if that
    refuses it, the source asks again."""
    demand = source if isinstance(source, SourceOnDemand) else SourceOnDemand.of(source)
    rest = _RestOfMetadata(demand, first_read, meta_chunk)
    first: list[bytes] = []

    async def first_request() -> None:
        try:
            if early is not None:
                first.append(await _read_early(early, demand, rest.needed))
                return
            first.append(await (await demand.get()).read_prefix(0, first_read, rest.needed))
        except RangeNotSatisfiableError:
            src = await demand.get()
            size = await src.size()  # a small image: learnt from the refusal
            first.append(await src.read(0, min(size, first_read)))
        finally:
            rest.first_done()

    # errors come out as themselves, not in an exception group (callers
    # handle SourceError), as Source.read_many does
    await both(first_request, rest.fetch)
    head = first[0]
    sb = Superblock.decode(head[:SUPERBLOCK_SIZE])
    if not sb.flags & SuperFlags.PACKED or sb.meta_end <= LOG_START:
        raise UsageError(f"{demand.name} is not a packed incfs image (made by `incfs pack`); "
                         "only packed images can be mounted from a source")
    if len(head) == first_read:
        head += rest.data
    if sb.meta_end > len(head):  # a source that does not stream, or a short answer
        ranges = [(o, min(meta_chunk, sb.meta_end - o))
                  for o in range(len(head), sb.meta_end, meta_chunk)]
        head += b"".join(await demand.read_ranges(ranges))
    return sb, head[:sb.meta_end]


async def _read_early(early: EarlyReader, demand: SourceOnDemand,
                      needed: Callable[[bytes], int | None]) -> bytes:
    """The first request's answer as `early` reads it, or, when it refuses
    that answer, as the source reads it when asked again."""
    try:
        # the rest of the answer (the first hash trees, after the metadata)
        # is kept for the loader: see open_cache
        return await early.read_prefix(needed, keep_rest=True)
    except EarlyRefused as e:
        log.info("%s: the early answer is not used (%s); asking again", demand.name, e)
        return await (await demand.get()).read_prefix(0, early.length, needed)


class _RestOfMetadata:
    """The metadata past the first request, fetched beside it once the
    superblock in its first bytes tells how much there is."""

    def __init__(self, source: SourceOnDemand, first_read: int, meta_chunk: int):
        self.source, self.first_read, self.meta_chunk = source, first_read, meta_chunk
        self.data = b""
        self._end: int | None = None
        self._known = trio.Event()

    def needed(self, head: bytes) -> int | None:
        end = _metadata_end(head)
        if end is not None and not self._known.is_set():
            self._end = end
            self._known.set()
        return end

    def first_done(self) -> None:
        """The first request is over: if it never told the size, nothing
        more is fetched here (fetch_metadata reads the rest after it)."""
        self._known.set()

    async def fetch(self) -> None:
        await self._known.wait()
        end = self._end
        if end is None or end <= self.first_read or end >= 1 << 62:
            return  # all in the first request, not known, or a damaged superblock
        ranges = [(o, min(self.meta_chunk, end - o))
                  for o in range(self.first_read, end, self.meta_chunk)]
        self.data = b"".join(await self.source.read_ranges(ranges))
