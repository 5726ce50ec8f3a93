"""Several copies of the same object, used as one Source.

Policy: prefer the first healthy mirror in the order given (the list order is
the operator's preference: nearest, cheapest). A mirror that fails is put in
cooldown and the read fails over to the next one. Once its cooldown has passed
it is preferred again, so traffic goes back to the first mirror as soon as it
is healthy; a mirror still cooling down is only tried as a last resort, so a
total outage is not made worse by refusing to even try.

Each mirror keeps its own `stats`; the mirror set's `stats` count logical
reads (requests), bytes delivered, failed mirror attempts (errors) and
attempts beyond the first for a read (retries: fail-overs and retried rounds).

A caller whose block failed verification uses `read_with_origin` to learn
which mirror served it, then `read_from_other(..., avoid=that)` to fetch the
same bytes elsewhere; the bad mirror is demoted (put in cooldown) by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import trio

from incfs.errors import UsageError
from incfs.sources.base import (
    PermanentSourceError,
    Source,
    SourceError,
    SourceIdentity,
    SourceStats,
    TransientSourceError,
    check_range,
    check_within,
)
from incfs.sources.retry import RetryPolicy, call_with_retry

#: What `avoid=` accepts: a mirror index, a mirror name, the Source itself,
#: or several of those.
MirrorRef = int | str | Source
AvoidSpec = MirrorRef | Iterable[MirrorRef] | None


class Mirror:
    """One mirror's health. Times are trio clock seconds."""

    def __init__(self, index: int, source: Source) -> None:
        self.index, self.source = index, source
        self.retry_at = -math.inf  # avoided (cooling down) until this time
        self.consecutive_failures = 0
        self.failures = 0
        self.last_error: SourceError | None = None
        self.size_checked = False

    def healthy(self, now: float) -> bool:
        return self.retry_at <= now

    def describe(self, now: float) -> dict[str, Any]:
        """Status for `incfs status`-style output."""
        return {
            "index": self.index,
            "name": self.source.name,
            "healthy": self.healthy(now),
            "cooldown_left": max(0.0, self.retry_at - now),
            "failures": self.failures,
            "last_error": str(self.last_error) if self.last_error else None,
            **self.source.stats.as_dict(),
        }


class MirroredSource(Source):
    """Fail-over over `sources`, which must all hold the same object.

    cooldown: seconds a failed mirror is passed over before being preferred
        again.
    retry: policy for whole rounds (every candidate mirror tried once); the
        mirrors' own policies should be short (see RetryPolicy.failover) so
        that a dead mirror costs little before the next is tried.
    expected_size: if known (e.g. from a manifest), mirrors of another size
        are refused; otherwise the first size a mirror reports is the truth
        and later mirrors must agree before they are used.
    """

    #: Options of the mirror set itself (the rest go to each mirror).
    OPTIONS = frozenset({"cooldown", "retry", "expected_size", "mirror_retry"})

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        cooldown: float = 30.0,
        retry: RetryPolicy | None = None,
        expected_size: int | None = None,
        name: str | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        if not sources:
            raise UsageError("MirroredSource needs at least one source")
        if cooldown < 0:
            raise UsageError("cooldown must be >= 0")
        concurrency = max_concurrency or max(s.max_concurrency for s in sources)
        super().__init__(name or " | ".join(s.name for s in sources),
                         max_concurrency=concurrency)
        self.mirrors = [Mirror(i, s) for i, s in enumerate(sources)]
        self.cooldown = cooldown
        self.retry = retry or RetryPolicy(max_attempts=3, base_delay=0.2, max_delay=5.0,
                                          deadline=300.0)
        self._size = expected_size
        self._size_lock = trio.Lock()

    def adopt_identity(self, identity: SourceIdentity) -> None:
        """The size is the object's, and every mirror must agree with it;
        validators are each server's own (two servers' ETags for one file
        differ), so they go to no mirror."""
        super().adopt_identity(SourceIdentity(identity.size))
        for mirror in self.mirrors:
            mirror.source.adopt_identity(SourceIdentity(identity.size))

    # -- choosing mirrors ---------------------------------------------------

    def mirror_indexes(self, ref: AvoidSpec) -> set[int]:
        """Resolve an index, name, Source, or collection of them."""
        if ref is None:
            return set()
        if isinstance(ref, (int, str, Source)):
            refs: Iterable[MirrorRef] = [ref]
        else:
            refs = ref
        found: set[int] = set()
        for item in refs:
            matches = {m.index for m in self.mirrors
                       if (isinstance(item, int) and not isinstance(item, bool)
                           and m.index == item)
                       or (isinstance(item, str) and m.source.name == item)
                       or (isinstance(item, Source) and m.source is item)}
            if not matches:
                raise UsageError(f"{self.name}: no mirror {item!r}")
            found |= matches
        return found

    def candidates(self, exclude: AbstractSet[int] = frozenset()) -> list[Mirror]:
        """Mirrors in the order to try now: healthy ones in preference order,
        then those cooling down, soonest-recovered first."""
        now = trio.current_time()
        usable = [m for m in self.mirrors if m.index not in exclude]
        healthy = [m for m in usable if m.healthy(now)]
        cooling = sorted((m for m in usable if not m.healthy(now)), key=lambda m: m.retry_at)
        return healthy + cooling

    @property
    def active(self) -> int:
        """Index of the mirror the next read will try first."""
        return self.candidates()[0].index

    def mark_failed(self, mirror: Mirror, error: SourceError) -> None:
        """Put a mirror in cooldown (also used for data that failed verification)."""
        mirror.failures += 1
        mirror.consecutive_failures += 1
        mirror.last_error = error
        mirror.retry_at = trio.current_time() + self.cooldown
        self.stats.errors += 1

    def _mark_ok(self, mirror: Mirror) -> None:
        mirror.consecutive_failures = 0
        mirror.retry_at = -math.inf

    def mirror_stats(self) -> list[dict[str, Any]]:
        """Per-mirror health and counters."""
        now = trio.current_time()
        return [m.describe(now) for m in self.mirrors]

    # -- size ---------------------------------------------------------------

    async def size(self) -> int:
        """The object size, from the first mirror that answers (cached)."""
        if self._size is None:
            async with self._size_lock:
                if self._size is None:
                    self.stats.requests += 1
                    _, mirror = await self._with_failover(self._size_of, set())
                    mirror.size_checked = True
        assert self._size is not None
        return self._size

    async def _size_of(self, mirror: Mirror) -> None:
        size = await mirror.source.size()
        if self._size is None:
            self._size = size

    async def _check_size(self, mirror: Mirror) -> None:
        """Refuse a mirror that holds a different size: it is stale or wrong."""
        if mirror.size_checked:
            return
        size = await mirror.source.size()
        if size != self._size:
            raise PermanentSourceError(
                f"{mirror.source.name}: mirror has {size} bytes, expected {self._size}")
        mirror.size_checked = True

    # -- reading ------------------------------------------------------------

    async def _with_failover(self, op: Any, exclude: AbstractSet[int]) -> tuple[Any, Mirror]:
        """Run `op(mirror)` on each candidate in turn until one succeeds;
        repeat whole rounds per `self.retry` while failures are transient."""
        attempts = 0

        async def one_round() -> tuple[Any, Mirror]:
            nonlocal attempts
            errors: list[SourceError] = []
            for mirror in self.candidates(exclude):
                attempts += 1
                if attempts > 1:
                    self.stats.retries += 1
                try:
                    result = await op(mirror)
                except SourceError as exc:
                    self.mark_failed(mirror, exc)
                    errors.append(exc)
                    continue
                self._mark_ok(mirror)
                return result, mirror
            raise self._all_failed(errors)

        if len(self.candidates(exclude)) == 0:
            raise PermanentSourceError(f"{self.name}: no mirror left to try")
        return await call_with_retry(self.retry, one_round, name=self.name)

    def _all_failed(self, errors: list[SourceError]) -> SourceError:
        """One error for a round in which every mirror failed: transient if
        any mirror might recover, else permanent; the same class as the
        mirrors' errors when they all agree (e.g. ObjectChangedError)."""
        kinds = {type(e) for e in errors}
        if len(kinds) == 1:
            cls: type[SourceError] = kinds.pop()
        elif any(isinstance(e, TransientSourceError) for e in errors):
            cls = TransientSourceError
        else:
            cls = PermanentSourceError
        detail = "; ".join(str(e) for e in errors)
        error = cls(f"{self.name}: all {len(errors)} mirror(s) failed: {detail}")
        error.__cause__ = errors[-1]
        return error

    async def read_with_origin(
        self, offset: int, length: int, *, avoid: AvoidSpec = None,
        progress: Callable[[bytes | bytearray], None] | None = None,
    ) -> tuple[bytes, int]:
        """Like `read`, also returning the index of the mirror that served it.
        With `progress`, the body streams as in `read_streaming` (a fail-over
        to another mirror starts it again)."""
        check_range(offset, length)
        exclude = self.mirror_indexes(avoid)
        check_within(self.name, offset, length, await self.size())
        self.stats.requests += 1

        async def op(mirror: Mirror) -> bytes:
            await self._check_size(mirror)
            if progress is not None:
                return await mirror.source.read_streaming(offset, length, progress)
            return await mirror.source.read(offset, length)

        data, mirror = await self._with_failover(op, exclude)
        self.stats.bytes += len(data)
        return data, mirror.index

    async def read(self, offset: int, length: int, *, avoid: AvoidSpec = None) -> bytes:
        """Exactly `length` bytes at `offset` from the best available mirror,
        never from the mirrors in `avoid`."""
        data, _ = await self.read_with_origin(offset, length, avoid=avoid)
        return data

    async def read_streaming(self, offset: int, length: int,
                             progress: Callable[[bytes | bytearray], None]) -> bytes:
        data, _ = await self.read_with_origin(offset, length, progress=progress)
        return data

    async def read_from_other(
        self, offset: int, length: int, avoid: AvoidSpec, *, demote: bool = True
    ) -> tuple[bytes, int]:
        """Fetch the same bytes from a mirror other than `avoid` (typically the
        one whose data failed verification). With `demote`, the avoided
        mirrors are put in cooldown, since they just served bad data.
        Returns (data, index of the mirror that served it)."""
        exclude = self.mirror_indexes(avoid)
        if not exclude:
            raise UsageError("read_from_other needs the mirror(s) to avoid")
        if demote:
            for index in exclude:
                self.mark_failed(self.mirrors[index], PermanentSourceError(
                    f"{self.mirrors[index].source.name}: served data that failed verification "
                    f"at {offset}+{length}"))
        return await self.read_with_origin(offset, length, avoid=exclude)

    async def aclose(self) -> None:
        """Close every mirror, even if one of them fails to close."""
        errors: list[BaseException] = []
        for mirror in self.mirrors:
            try:
                await mirror.source.aclose()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]
