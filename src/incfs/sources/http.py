"""HTTP(S) objects as a Source: one Range request per read, strictly checked.

Strictness is the point. A proxy or server that ignores `Range` and answers
200 with the whole file, labels a response with a different range, or cuts the
body short would otherwise hand the block loader plausible-looking wrong
bytes; here each of those raises. Accepted answers:

* 206 whose Content-Range is exactly the asked range and whose body is
  exactly that long;
* 200 only when the asked range is the whole object (offset 0, length ==
  object size), which is how servers legitimately answer such a request.

The first ETag (else Last-Modified) and total size seen are remembered;
a later response carrying different ones raises ObjectChangedError.
`Accept-Encoding: identity` is sent and encoded answers are refused, since a
byte range of a gzip stream is not a byte range of the object.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import trio

from incfs.errors import UsageError
from incfs import preconnect
from incfs.sources.base import (
    AccessDeniedError,
    NotFoundError,
    ObjectChangedError,
    PermanentSourceError,
    RangeNotSatisfiableError,
    Source,
    SourceError,
    SourceIdentity,
    TransientSourceError,
    check_range,
    check_within,
)
from incfs.sources.retry import RetryPolicy, call_with_retry

if TYPE_CHECKING:  # httpx costs ~60 ms to import: only mounts of URLs pay for it
    import httpx

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
# Seconds an answer may stall before a request counts as failed (and is
# retried): generous, since a slow link is not a dead one.
READ_TIMEOUT = 30.0
# Statuses where the server itself says "later might work".
_TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507, 509, 520, 521,
                                 522, 523, 524})


def _import_httpx() -> Any:
    """httpx without its command-line client. `import httpx` also imports
    `httpx._main` (rich, click and pygments, when installed): about 40 ms of
    every daemon start for a tool the daemon never runs. A None in
    sys.modules makes that one import fail, and httpx then defines a stub."""
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    import httpx

    return httpx


@functools.cache
def _ssl_context(verify: bool | str) -> Any:
    """One TLS context per trust setting for the whole process: a mount
    opens a source for its metadata, another for the loader and maybe a
    probe. The default one parses its CA bundle only at its first handshake
    (see _TrustOnFirstHandshake)."""
    if verify is True:
        return _TrustOnFirstHandshake.create()
    return _import_httpx().create_ssl_context(verify=verify)


class _TrustOnFirstHandshake(ssl.SSLContext):
    """A verifying client context (what httpx's default is) that loads its CA
    bundle when it first wraps a connection instead of when it is made.
    Parsing the bundle takes ~15 ms of the GIL, and a mount of an http://
    URL makes clients that want a context (a redirect may lead to https)
    but never speak TLS. Which bundle follows httpx: SSL_CERT_FILE, else
    SSL_CERT_DIR, else certifi's."""

    _trust_lock: threading.Lock
    _trust: dict[str, str] | None

    @classmethod
    def create(cls) -> _TrustOnFirstHandshake:
        ctx = cls(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
        ctx._trust_lock = threading.Lock()
        if os.environ.get("SSL_CERT_FILE"):
            ctx._trust = {"cafile": os.environ["SSL_CERT_FILE"]}
        elif os.environ.get("SSL_CERT_DIR"):
            ctx._trust = {"capath": os.environ["SSL_CERT_DIR"]}
        else:
            import certifi

            ctx._trust = {"cafile": certifi.where()}
        if os.environ.get("SSLKEYLOGFILE"):  # as ssl.create_default_context does
            ctx.keylog_filename = os.environ["SSLKEYLOGFILE"]
        return ctx

    def _load_trust(self) -> None:
        with self._trust_lock:
            if self._trust is not None:
                self.load_verify_locations(**self._trust)
                self._trust = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load_trust()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load_trust()  # trio's SSLStream, which httpcore uses, wraps BIOs
        return super().wrap_bio(*args, **kwargs)


def _speaks_http2(url: str) -> bool:
    """httpx speaks HTTP/2 only where TLS offers it (ALPN), never to a plain
    http:// server (no h2c), so a client of an http:// URL does not ask for
    it (and a redirect from there to https:// stays on HTTP/1.1)."""
    return url[:8].lower() == "https://"


def redact_url(url: str) -> str:
    """URL without credentials or query: presigned URLs carry secrets in the
    query string, and `name` ends up in logs and error messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes a-b/total` -> (a, b, total or None for `*`); None if malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    start, end = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def status_error(name: str, response: httpx.Response) -> SourceError:
    """Classify a non-success HTTP status."""
    status = response.status_code
    message = f"{name}: HTTP {status} {response.reason_phrase}".rstrip()
    if status in (404, 410):
        return NotFoundError(message)
    if status in (401, 403):
        return AccessDeniedError(message)
    if status == 412:
        return ObjectChangedError(message)
    if status == 416:
        return RangeNotSatisfiableError(message)
    if status in _TRANSIENT_STATUSES:
        return TransientSourceError(message)
    return PermanentSourceError(message)


def transport_error(name: str, exc: httpx.HTTPError) -> SourceError:
    """Classify an httpx exception: our own mistakes and redirect loops are
    permanent; everything on the wire (timeouts, resets, refused connections,
    truncated bodies) is transient."""
    import httpx

    detail = f"{name}: {type(exc).__name__}: {_reason(exc)}".rstrip(": ")
    untrusted = _in_chain(exc, ssl.SSLCertVerificationError)
    if untrusted is not None:  # asking again will not make it trusted
        return PermanentSourceError(f"{name}: the server's TLS certificate is not trusted "
                                    f"({untrusted}); SSL_CERT_FILE names a CA bundle to trust")
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError,
                        httpx.TooManyRedirects)):
        return PermanentSourceError(detail)
    return TransientSourceError(detail)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it, and so on (each once)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _in_chain(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` among `exc` and its causes."""
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def _reason(exc: BaseException) -> str:
    """The first message in `exc`'s chain: httpx often wraps a transport
    error (a TLS alert, a reset) in an exception with no text of its own."""
    return next((str(e) for e in _causes(exc) if str(e)), "")


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _early_connections(url: httpx.URL) -> int:
    """How many connections to the URL's host our parent opened early
    (incfs.preconnect); they are this process's from now on."""
    preconnect.adopt()
    port = url.port or (443 if url.scheme == "https" else 80)
    return preconnect.available(url.host, port)


def _early_transport(verify: bool | str, http2: bool, limits: httpx.Limits) -> Any:
    from .early_http import EarlyTransport  # only when there are early connections

    return EarlyTransport(ssl_context=_ssl_context(verify), http2=http2, limits=limits)


class HttpSource(Source):
    """Byte ranges of one object behind an http:// or https:// URL.

    One `httpx.AsyncClient` per source (keep-alive pool, HTTP/2 when the
    server offers it over TLS, redirects followed). `headers` are added to
    every request, e.g. `{"Authorization": "Bearer ..."}`; httpx drops
    Authorization on cross-host redirects. At most `max_connections` requests
    are in flight; further reads queue here rather than time out in the
    connection pool.
    """

    SCHEMES: ClassVar[tuple[str, ...]] = ("http", "https")
    OPTIONS = frozenset({"headers", "timeout", "connect_timeout", "max_connections",
                         "http2", "verify", "retry", "check_validators", "name"})

    @classmethod
    def spec_args(cls, spec: str) -> dict[str, Any]:
        return {"url": spec}

    @classmethod
    def preload(cls, specs: list[str]) -> None:
        if not any(_speaks_http2(spec) for spec in specs):
            # no https: HTTP/2 is never spoken, and httpcore would import h2
            # (~8 ms of every start) only to offer it. (Every spec the
            # process opens is here: no client will ask for it.)
            sys.modules.setdefault("h2", None)  # type: ignore[arg-type]
        _ssl_context(True)
        _import_httpx()
        import httpcore  # noqa: F401  httpx imports it when the first client is made

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = READ_TIMEOUT,
        connect_timeout: float = 10.0,
        max_connections: int = 16,
        http2: bool = True,
        verify: bool | str = True,
        retry: RetryPolicy | None = None,
        check_validators: bool = True,
        name: str | None = None,
    ) -> None:
        httpx = _import_httpx()  # here, not at module level: see the TYPE_CHECKING import

        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise UsageError(f"invalid URL {url!r}: {exc}") from exc
        if parsed.scheme not in ("http", "https"):
            raise UsageError(f"not an http(s) URL: {redact_url(url)}")
        super().__init__(name or redact_url(url), max_concurrency=max_connections)
        self.url = url
        self.retry = retry or RetryPolicy()
        self.check_validators = check_validators
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections, keepalive_expiry=30.0)
        http2 = http2 and _speaks_http2(url)
        self.stats.early_connections = _early_connections(parsed)
        self._client = httpx.AsyncClient(
            http2=http2,
            follow_redirects=True,
            max_redirects=10,
            verify=_ssl_context(verify),
            headers={"Accept-Encoding": "identity", "User-Agent": preconnect.USER_AGENT,
                     **dict(headers or {})},
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=limits,
            transport=_early_transport(verify, http2, limits) if self.preconnected else None,
        )
        self._limiter = trio.CapacityLimiter(max_connections)
        self._size_lock = trio.Lock()

    @property
    def preconnected(self) -> int:
        """Connections our parent opened early that this source was given."""
        return self.stats.early_connections

    # -- identity -----------------------------------------------------------

    def _check_identity(self, response: httpx.Response, total: int | None) -> None:
        """Remember the object's size and validator on first sight; raise
        ObjectChangedError when a later response disagrees."""
        self.adopt_identity(SourceIdentity(total, response.headers.get("etag"),
                                           response.headers.get("last-modified")))

    def _check_encoding(self, response: httpx.Response) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise PermanentSourceError(
                f"{self.name}: server sent Content-Encoding {encoding!r} despite "
                "Accept-Encoding: identity; byte ranges would be of the encoded data")

    # -- requests -----------------------------------------------------------

    async def _send(
        self,
        method: str,
        headers: dict[str, str],
        handle: Callable[[httpx.Response], Awaitable[T]],
    ) -> T:
        """Send one request and pass the streaming response to `handle`,
        translating httpx errors. Bounded by the connection limiter."""
        import httpx  # already loaded by __init__: a dict lookup

        async with self._limiter:
            self.stats.requests += 1
            try:
                async with self._client.stream(method, self.url, headers=headers) as response:
                    return await handle(response)
            except httpx.HTTPError as exc:
                raise transport_error(self.name, exc) from exc

    async def _read_exact(self, response: httpx.Response, length: int,
                          needed: Callable[[bytes], int | None] | None = None,
                          progress: Callable[[bytearray], None] | None = None) -> bytes:
        """Read the raw body, which must be exactly `length` bytes; with
        `needed` (see Source.read_prefix), stop once that many are in. The
        rest is dropped with its connection: draining it would cost link
        time the mount's first reads want (200 ms for 256 KiB at 10 Mbit/s).
        `progress` sees the body so far after each piece (read_streaming)."""
        buf = bytearray()
        want: int | None = None
        async for chunk in response.aiter_raw():
            buf += chunk
            if len(buf) > length:
                raise PermanentSourceError(
                    f"{self.name}: body is longer than the {length} bytes asked")
            if progress is not None:
                progress(buf)
            if needed is not None and want is None:
                want = needed(bytes(buf))
            if want is not None and len(buf) >= want:
                return bytes(buf)
        if len(buf) < length:
            raise TransientSourceError(
                f"{self.name}: short body, got {len(buf)} of {length} bytes")
        return bytes(buf)

    async def _handle_range(self, response: httpx.Response, offset: int, length: int,
                            needed: Callable[[bytes], int | None] | None = None,
                            progress: Callable[[bytearray], None] | None = None) -> bytes:
        end = offset + length - 1
        status = response.status_code
        if status == 206:
            raw = response.headers.get("content-range")
            parsed = parse_content_range(raw)
            if parsed is None:
                raise PermanentSourceError(
                    f"{self.name}: 206 without a usable Content-Range ({raw!r})")
            start, stop, total = parsed
            self._check_identity(response, total)
            if (start, stop) != (offset, end):
                if total is not None:
                    check_within(self.name, offset, length, total)
                raise PermanentSourceError(f"{self.name}: asked for bytes {offset}-{end}, "
                                           f"server answered Content-Range {raw!r}")
        elif status == 200:
            # The whole object. Only acceptable if that is what we asked for.
            declared = _content_length(response)
            if offset != 0 or (declared is not None and declared != length):
                raise PermanentSourceError(
                    f"{self.name}: server ignored the Range header (200 with the whole "
                    "object); ranged reads are not possible from this server")
            self._check_encoding(response)
            self._check_identity(response, declared)
        elif status == 416:
            unsatisfied = _UNSATISFIED_RANGE.match(response.headers.get("content-range", ""))
            if unsatisfied:
                self._check_identity(response, int(unsatisfied[1]))
            raise status_error(self.name, response)
        else:
            raise status_error(self.name, response)
        self._check_encoding(response)
        declared = _content_length(response)
        if declared is not None and declared != length:
            error = TransientSourceError if declared < length else PermanentSourceError
            raise error(f"{self.name}: Content-Length {declared} for a {length}-byte range")
        return await self._read_exact(response, length, needed, progress)

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, retried per `self.retry`."""
        return await self._read(offset, length, None)

    async def read_prefix(self, offset: int, length: int,
                          needed: Callable[[bytes], int | None]) -> bytes:
        return await self._read(offset, length, needed)

    async def read_streaming(self, offset: int, length: int,
                             progress: Callable[[bytes | bytearray], None]) -> bytes:
        # the status line and headers are checked before any of the body
        # is shown (a range of another object never reaches `progress`)
        return await self._read(offset, length, None, progress)

    async def _read(self, offset: int, length: int,
                    needed: Callable[[bytes], int | None] | None,
                    progress: Callable[[bytearray], None] | None = None) -> bytes:
        check_range(offset, length)
        if length == 0:
            return b""
        if self._size is not None:
            check_within(self.name, offset, length, self._size)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}

        async def handle(response: httpx.Response) -> bytes:
            return await self._handle_range(response, offset, length, needed, progress)

        async def attempt() -> bytes:
            return await self._send("GET", headers, handle)

        data = await call_with_retry(self.retry, attempt, name=self.name, stats=self.stats)
        self.stats.bytes += len(data)
        return data

    # -- size ---------------------------------------------------------------

    async def size(self) -> int:
        """Object size: HEAD, else a one-byte ranged GET (some servers and
        presigned URLs refuse HEAD). Cached after the first answer."""
        if self._size is None:
            async with self._size_lock:
                if self._size is None:
                    await call_with_retry(self.retry, self._probe_size,
                                          name=self.name, stats=self.stats)
        assert self._size is not None
        return self._size

    async def _probe_size(self) -> None:
        async def handle_head(response: httpx.Response) -> bool:
            declared = _content_length(response)
            encoding = response.headers.get("content-encoding", "identity").lower()
            if response.status_code == 200 and declared is not None \
                    and encoding in ("", "identity"):
                self._check_identity(response, declared)
                return True
            if response.status_code in (404, 410) or response.status_code >= 500:
                raise status_error(self.name, response)
            return False  # e.g. 403/405 for HEAD: try a ranged GET instead

        if await self._send("HEAD", {}, handle_head):
            return
        await self._send("GET", {"Range": "bytes=0-0"}, self._handle_size_probe)

    async def _handle_size_probe(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 206:
            parsed = parse_content_range(response.headers.get("content-range"))
            if parsed is None or parsed[2] is None:
                raise PermanentSourceError(f"{self.name}: cannot learn the object size "
                                           "(no total in Content-Range)")
            self._check_identity(response, parsed[2])
            await response.aread()  # drain the byte so the connection is reusable
        elif status == 416:
            unsatisfied = _UNSATISFIED_RANGE.match(response.headers.get("content-range", ""))
            if not unsatisfied:
                raise status_error(self.name, response)
            self._check_identity(response, int(unsatisfied[1]))  # empty object
        elif status == 200 and _content_length(response) is not None:
            # Range ignored; the size is still right, reads will fail clearly.
            self._check_identity(response, _content_length(response))
        else:
            raise status_error(self.name, response)

    async def aclose(self) -> None:
        await self._client.aclose()
