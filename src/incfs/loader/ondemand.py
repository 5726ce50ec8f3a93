"""A mount's source before its HTTP client is imported.

A new cache's metadata is read without the client (incfs.loader.early), so
the mount comes up without httpx (~30 ms to import). Its first reads need
no client either: an early connection still idle carries each one (h11, held
to the first answer's size and ETag), and goes back to the pool once its
answer is read whole, for the next read or for the client. `SourceOnDemand`
is that: reads over idle early connections, and the real source opened the
first time one finds no connection left, or its answer is refused (the
client then asks again, retries and words the error as usual), or when its
owner asks (`get`). open_cache reads a long metadata's rest through one; the
loader reads its first blocks through one until it imports the client,
after its first read (docs/startup.md, step 4).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import trio

from .. import preconnect
from ..sources import Source, SourceIdentity, SourceStats
from ..sources.http import redact_url
from .early import EarlyReader, EarlyRefused
from .remote import open_imported_source, open_loader_source

log = logging.getLogger("incfs.loader")


class SourceOnDemand:
    """`config`'s source, opened the first time it is wanted. With an early
    answer's identity (`early`'s, once read, or `identity`), reads go over
    idle early connections first; without one, they go through the source.
    A source opened so takes that identity as first seen."""

    def __init__(self, config, early: EarlyReader | None = None,
                 identity: SourceIdentity | None = None):
        self.config, self.early, self._identity = config, early, identity
        self.opened: Source | None = None
        # what reads over early connections did: added to the source's own
        # counters when it opens, so its status counts every request
        self.stats = SourceStats()
        if identity is not None:  # (the loader's: its status shows these until it opens)
            self.stats.early_connections = preconnect.available_to(config.source)
        self._lock = trio.Lock()

    @classmethod
    def of(cls, source: Source) -> SourceOnDemand:
        """One for a source that is open already."""
        demand = cls(None)
        demand.opened = source
        return demand

    @property
    def identity(self) -> SourceIdentity | None:
        return self.early.identity if self.early is not None else self._identity

    @property
    def name(self) -> str:
        return self.opened.name if self.opened is not None else redact_url(self.config.source)

    async def get(self) -> Source:
        async with self._lock:
            if self.opened is None:
                if self.identity is None and self.early is None:
                    self.opened = open_loader_source(self.config)
                else:
                    self.opened = await open_imported_source(self.config, self.identity)
                self._hand_over_stats(self.opened.stats)
            return self.opened

    async def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`: over an early connection still idle
        while the source is not open (and an early answer said what the
        object is), else through the source."""
        data = await self._read_early(offset, length, None)
        return data if data is not None else await (await self.get()).read(offset, length)

    async def read_streaming(self, offset: int, length: int,
                             progress: Callable[[bytes | bytearray], None]) -> bytes:
        """`read`, calling `progress` with the body so far as it comes in
        (Source.read_streaming); a refused early answer's bytes may have been
        shown to it already: the source's answer starts the body again."""
        data = await self._read_early(offset, length, progress)
        if data is not None:
            return data
        return await (await self.get()).read_streaming(offset, length, progress)

    async def _read_early(self, offset: int, length: int,
                          progress: Callable[[bytearray], None] | None) -> bytes | None:
        """The range over an idle early connection, or None when there is
        none (or the source is open, or the answer was refused)."""
        if self.opened is not None or self.identity is None:
            return None
        reader = EarlyReader.idle(self.config, offset, length, self.identity)
        if reader is None:
            return None
        try:
            data = await reader.read_prefix(None, progress)
        except EarlyRefused as e:
            log.info("%s: an early answer is not used (%s); asking again", self.name, e)
            self._count(errors=1)
            return None
        self._count(requests=1, nbytes=len(data))
        return data

    async def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length), side by side (see `read`)."""
        if self.identity is None:
            return await (await self.get()).read_many(ranges)
        got = [b""] * len(ranges)

        async def one(i: int) -> None:
            got[i] = await self.read(*ranges[i])

        await both(*(functools.partial(one, i) for i in range(len(ranges))))
        return got

    async def aclose(self) -> None:
        if self.opened is not None:
            await self.opened.aclose()

    def _count(self, requests: int = 0, nbytes: int = 0, errors: int = 0) -> None:
        self.stats.requests += requests
        self.stats.early_requests += requests
        self.stats.bytes += nbytes
        self.stats.errors += errors

    def _hand_over_stats(self, stats: SourceStats) -> None:
        """Add what early reads did to the opened source's counters, and
        count any later ones there too."""
        stats.add(self.stats)
        self.stats = stats


async def both(*tasks) -> None:
    """Run the tasks side by side; the first failure cancels the others and
    is raised as itself (callers handle SourceError, not exception groups)."""
    failures: list[Exception] = []

    async def run(task, cancel: trio.CancelScope) -> None:
        try:
            await task()
        except Exception as exc:
            failures.append(exc)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(run, task, nursery.cancel_scope)
    if failures:
        raise failures[0]
