"""A file on a local (or locally mounted) file system as a Source.

Reads use `os.pread` in a worker thread: it needs no shared file position, so
concurrent reads on one descriptor are safe, and the thread keeps a slow disk
or a network mount from stalling the trio event loop.
"""

from __future__ import annotations

import errno
import os
import urllib.parse
from typing import Any

import trio

from incfs.errors import UsageError
from incfs.sources.base import (
    NotFoundError,
    ObjectChangedError,
    PermanentSourceError,
    Source,
    SourceError,
    SourceIdentity,
    TransientSourceError,
    check_range,
    check_within,
)
from incfs.sources.retry import RetryPolicy, call_with_retry

# errno values that will not go away by trying again.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
     errno.ENXIO, errno.EINVAL, errno.ELOOP, errno.ENAMETOOLONG, errno.EBADF}
)


def _os_error(name: str, exc: OSError) -> SourceError:
    """Classify an OSError: missing/forbidden is permanent, I/O hiccups
    (EIO on a network mount, EAGAIN, ETIMEDOUT ...) are worth retrying."""
    message = f"{name}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM):
        return NotFoundError(message)
    if exc.errno in _PERMANENT_ERRNOS:
        return PermanentSourceError(message)
    return TransientSourceError(message)


class LocalSource(Source):
    """Read byte ranges of a local file.

    The file is opened lazily (constructors do no I/O) and kept open. Its
    size and mtime are remembered at open; a later read that sees either
    change raises ObjectChangedError, because an image rewritten in place
    would otherwise be served half old, half new.
    """

    SCHEMES = ("", "file")
    OPTIONS = frozenset({"retry", "max_concurrency", "name"})
    REMOTE = False

    @classmethod
    def spec_args(cls, spec: str) -> dict[str, Any]:
        if not spec.lower().startswith("file://"):
            if not spec:
                raise UsageError("empty source spec")
            return {"path": spec}
        parts = urllib.parse.urlsplit(spec)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file:// URL with a remote host: {spec!r}")
        return {"path": urllib.parse.unquote(parts.path)}

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 16,
        name: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(name or self.path, max_concurrency=max_concurrency)
        self.retry = retry or RetryPolicy(max_attempts=3, deadline=60.0)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (size, mtime_ns)
        self._open_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._closed = False
        # Reads in flight; aclose waits for them so a descriptor is never
        # closed (and possibly reused by another open) under a running pread.
        self._inflight = 0
        self._drained: trio.Event | None = None

    async def _ensure_open(self) -> int:
        async with self._open_lock:
            if self._closed:
                raise PermanentSourceError(f"{self.name}: source is closed")
            if self._fd is None:
                fd, identity = await trio.to_thread.run_sync(
                    self._open_sync, limiter=self._limiter
                )
                try:  # the size this source was handed, if any, must be the file's
                    self.adopt_identity(SourceIdentity(identity[0]))
                except ObjectChangedError:
                    os.close(fd)
                    raise
                self._fd, self._identity = fd, identity
            return self._fd

    def _open_sync(self) -> tuple[int, tuple[int, int]]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_error(self.name, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise _os_error(self.name, exc) from exc
        return fd, (st.st_size, st.st_mtime_ns)

    async def size(self) -> int:
        """Size as seen when the file was opened."""
        async def op() -> int:
            await self._ensure_open()
            assert self._identity is not None
            return self._identity[0]

        return await call_with_retry(self.retry, op, name=self.name, stats=self.stats)

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (RangeNotSatisfiableError past EOF)."""
        check_range(offset, length)
        if length == 0:
            return b""

        async def op() -> bytes:
            self._inflight += 1
            try:
                fd = await self._ensure_open()
                assert self._identity is not None
                check_within(self.name, offset, length, self._identity[0])
                self.stats.requests += 1
                return await trio.to_thread.run_sync(
                    self._pread_sync, fd, offset, length, limiter=self._limiter
                )
            finally:
                self._inflight -= 1
                if self._inflight == 0 and self._drained is not None:
                    self._drained.set()

        data = await call_with_retry(self.retry, op, name=self.name, stats=self.stats)
        self.stats.bytes += len(data)
        return data

    def _pread_sync(self, fd: int, offset: int, length: int) -> bytes:
        """pread may return less than asked (signals, network mounts): loop
        until done, and treat an early EOF as the file having shrunk."""
        parts: list[bytes] = []
        done = 0
        try:
            while done < length:
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    break
                parts.append(chunk)
                done += len(chunk)
            st = os.fstat(fd)
        except OSError as exc:
            raise _os_error(self.name, exc) from exc
        if (st.st_size, st.st_mtime_ns) != self._identity:
            raise ObjectChangedError(f"{self.name}: file changed while being read")
        if done != length:
            raise ObjectChangedError(f"{self.name}: file is shorter than when opened")
        return b"".join(parts)

    async def aclose(self) -> None:
        async with self._open_lock:
            self._closed = True
        if self._inflight:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
