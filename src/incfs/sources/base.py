"""The one interface every remote-object backend implements.

A `Source` answers two questions about a single immutable object: how big is
it, and what are the bytes in `[offset, offset + length)`. Everything above it
(the block loader, verification, caching) only needs those two answers, so the
backends stay small and interchangeable, in the spirit of fsspec but async
(trio) and strict: a read returns exactly the bytes asked for or raises.

Errors are split by what the caller should do about them:

* `TransientSourceError` - trying again (later, or on another mirror) may
  succeed: timeouts, resets, 5xx answers, truncated bodies.
* `PermanentSourceError` - trying the same thing again will fail the same way:
  missing object, no permission, range past the end, the object changed.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple, Self

import trio

from incfs.errors import IncfsError, UsageError

#: How many reads `read_many` runs at once unless a backend says otherwise.
DEFAULT_CONCURRENCY = 8


class SourceError(IncfsError):
    """A source could not deliver what was asked; see the two subclasses."""

    errno = errno.EIO


class TransientSourceError(SourceError):
    """Retrying (after a pause, or on another mirror) may succeed."""


class PermanentSourceError(SourceError):
    """Retrying the same request on the same source will not help."""


class NotFoundError(PermanentSourceError):
    """The object (or its bucket) does not exist."""

    errno = errno.ENOENT


class AccessDeniedError(PermanentSourceError):
    """The server refuses us the object (401/403, AccessDenied)."""

    errno = errno.EACCES


class RangeNotSatisfiableError(PermanentSourceError):
    """The asked range reaches past the end of the object."""

    errno = errno.EINVAL


class ObjectChangedError(PermanentSourceError):
    """The object is no longer the one we started reading (ETag, mtime or size
    changed). Mixing bytes of two versions would corrupt the image, so this is
    never retried on the same source."""

    errno = errno.ESTALE


@dataclass
class SourceStats:
    """Counters for one source. Plain ints: every update happens on the trio
    thread, so no locking is needed.

    requests: requests sent to the backend (HEADs included; for a mirror set,
              logical reads); bytes: payload bytes delivered to callers;
    errors:   failed attempts; retries: attempts beyond the first (for a mirror
              set, also fail-overs to another mirror);
    early_connections: connections opened before this process started that
              the source was given (incfs.preconnect; http(s) only);
    early_requests: requests of a new cache's mount sent over those before
              the client was imported (incfs.loader.ondemand; included in
              `requests`).
    """

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    retries: int = 0
    early_connections: int = 0
    early_requests: int = 0

    def as_dict(self) -> dict[str, int]:
        """A snapshot suitable for JSON or log lines."""
        return asdict(self)

    def add(self, other: SourceStats) -> None:
        """Count what `other` counted here too (a source taking over from
        whatever read for it before it opened). Not `early_connections`:
        each source counts the connections it was given itself."""
        self.requests += other.requests
        self.early_requests += other.early_requests
        self.bytes += other.bytes
        self.errors += other.errors
        self.retries += other.retries


class SourceIdentity(NamedTuple):
    """What one answer said about the object behind a source: its size and
    validators (ETag, else Last-Modified; raw header values). A source given
    one (`Source.adopt_identity`) takes any later answer that disagrees as
    "the object changed", as if it had seen this answer itself."""

    size: int | None
    etag: str | None = None
    last_modified: str | None = None


def check_range(offset: int, length: int) -> None:
    """Reject nonsense before it becomes a malformed request header."""
    if offset < 0 or length < 0:
        raise UsageError(f"invalid range: offset={offset} length={length}")


def check_within(name: str, offset: int, length: int, size: int) -> None:
    """Raise RangeNotSatisfiableError if the range is not inside `size` bytes."""
    if offset + length > size:
        raise RangeNotSatisfiableError(
            f"{name}: range {offset}+{length} is past the end of the object ({size} bytes)"
        )


class Source(abc.ABC):
    """Random access to the bytes of one remote (or local) object.

    Subclasses implement `size` and `read`; `read_many` runs reads
    concurrently, bounded by `max_concurrency` so one big request list cannot
    open hundreds of connections or threads.
    """

    #: URL schemes this backend serves ("" stands for a bare local path);
    #: the registry (incfs.sources.registry) picks a backend by these.
    SCHEMES: ClassVar[tuple[str, ...]] = ()
    #: Keyword options the constructor accepts (unknown ones are an error).
    OPTIONS: ClassVar[frozenset[str]] = frozenset()
    #: Whether reading needs the network (a mount from it needs a cache).
    REMOTE: ClassVar[bool] = True
    #: Whether answers' validators (ETag, Last-Modified) are checked
    #: (adopt_identity); a backend may let its user turn that off.
    check_validators: bool = True

    name: str
    stats: SourceStats
    max_concurrency: int

    @classmethod
    def spec_args(cls, spec: str) -> dict[str, Any]:
        """Constructor arguments named by a spec of one of `SCHEMES`
        (raise UsageError when the spec is malformed)."""
        raise UsageError(f"{cls.__name__} cannot be opened from a spec")

    @classmethod
    def preload(cls, specs: list[str]) -> None:
        """Import the client library this backend needs, ahead of opening
        one (a mount does it before its metadata fetch, which runs while a
        worker thread loads the rest of the daemon). `specs`: every source
        the process will open, this backend's and others'."""

    def __init__(self, name: str, *, max_concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if max_concurrency < 1:
            raise UsageError("max_concurrency must be at least 1")
        self.name = name
        self.max_concurrency = max_concurrency
        self.stats = SourceStats()
        # the object's identity as first seen (adopt_identity)
        self._size: int | None = None
        self._etag: str | None = None
        self._last_modified: str | None = None

    @abc.abstractmethod
    async def size(self) -> int:
        """Size of the object in bytes (cached after the first answer)."""

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes starting at `offset`, or raise SourceError."""

    def adopt_identity(self, identity: SourceIdentity) -> None:
        """Remember the object's size and validator on first sight, whether
        from this source's own answers or from one read elsewhere
        (incfs.loader.early); raise ObjectChangedError when a later one
        disagrees. The validator is the ETag (a proxy's W/ weakening of it
        ignored), else Last-Modified; `check_validators` False (servers
        whose validators cannot be trusted) leaves only the size."""
        total = identity.size
        if total is not None:
            if self._size is None:
                self._size = total
            elif total != self._size:
                raise ObjectChangedError(
                    f"{self.name}: object size changed from {self._size} to {total}")
        if not self.check_validators:
            return
        if identity.etag:
            etag = identity.etag.removeprefix("W/")
            if self._etag is None:
                self._etag = etag
            elif etag != self._etag:
                raise ObjectChangedError(
                    f"{self.name}: ETag changed from {self._etag} to {etag}")
            return
        modified = identity.last_modified
        if modified:
            if self._last_modified is None:
                self._last_modified = modified
            elif modified != self._last_modified:
                raise ObjectChangedError(f"{self.name}: Last-Modified changed from "
                                         f"{self._last_modified} to {modified}")

    async def read_prefix(self, offset: int, length: int,
                          needed: Callable[[bytes], int | None]) -> bytes:
        """At least the first `needed(data)` bytes of `length` at `offset`:
        `needed` tells from what has come in so far how many bytes are
        wanted (None: it cannot tell yet). A backend that streams stops there
        and drops the rest (a mount reads its metadata so, not knowing its
        size before the superblock is in); this default reads all `length`."""
        return await self.read(offset, length)

    async def read_streaming(self, offset: int, length: int,
                             progress: Callable[[bytes | bytearray], None]) -> bytes:
        """Like `read`; `progress(body)` is called with the bytes of the range
        received so far each time more come in, so a caller can use its first
        blocks before the last arrive. A retry starts the body again from
        its first byte. `body` may grow after the call: copy what you keep.
        This default (for backends that do not stream) calls it once, with
        all of the range."""
        data = await self.read(offset, length)
        progress(data)
        return data

    async def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several `(offset, length)` ranges concurrently; results are in
        the order asked. The first failure cancels the remaining reads and is
        raised as itself (not wrapped in an exception group), because callers
        handle SourceError, not trio's plumbing."""
        for offset, length in ranges:
            check_range(offset, length)
        results: list[bytes | None] = [None] * len(ranges)
        failures: list[BaseException] = []
        work: Iterator[tuple[int, tuple[int, int]]] = iter(enumerate(ranges))

        async def worker(cancel: trio.CancelScope) -> None:
            # Workers share one iterator: trio never switches tasks inside
            # next(), so each range is taken exactly once.
            for index, (offset, length) in work:
                try:
                    results[index] = await self.read(offset, length)
                except Exception as exc:
                    failures.append(exc)
                    cancel.cancel()
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.max_concurrency, len(ranges))):
                nursery.start_soon(worker, nursery.cancel_scope)
        if failures:
            raise failures[0]
        done = [r for r in results if r is not None]
        assert len(done) == len(ranges), "every range is read when nothing failed"
        return done

    async def aclose(self) -> None:
        """Release connections, file descriptors and clients. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
