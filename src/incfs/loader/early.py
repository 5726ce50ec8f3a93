"""The answer to a new cache's metadata request, read before the HTTP client
is imported.

`cachefile.ask_early` sends a new cache's first metadata read (the first
`first_read` bytes of the image) on a connection opened before the daemon
started. Importing httpx and httpcore to read its answer costs ~40 ms of a
cold start's ~200 ms to a visible tree; reading one response on one socket
needs none of it. So `EarlyReader` reads it with h11 (the HTTP/1.1 parser
httpcore itself is built on, ~6 ms to import), and the mount is up before
httpx is loaded: the loader imports it after its first read, in a worker
thread (docs/startup.md, step 4; the first reads go over idle early
connections meanwhile, incfs.loader.ondemand), or sooner, if the reader has
to wait for the answer (`on_wait`: on a slow link the import fills that
wait).

The reading is as strict as `sources.http`'s: the answer must be a 206 whose
Content-Range is exactly the range asked, of a known total size, with no
content coding and no Content-Length but the range's, and its body the
bytes of that range. Anything else (another status, an odd header, a stall
past the read timeout, a reset, a body cut short, a malformed answer)
raises `EarlyRefused` before a byte of the body is used, and the caller
asks again through the HTTP client, which retries, fails over and words
the error as usual. Once the image's superblock is in,
the reader stops at the end of the metadata and closes the connection, as
`Source.read_prefix` does: the rest of the range is not worth link time.

Metadata longer than the first read (images of more than ~300 files) is
read the same way: its rest is asked for on the early connections still
idle (`EarlyReader.idle`, a request each), once the superblock says how
much is left, and each answer must name the object the first did (size,
ETag, Last-Modified). Only with no idle connection left, or an answer
refused, is the client imported to ask.

The loader's first data reads go the same way (`loader.ondemand`), until its
client is imported: a connection whose answer was read to its end goes back
to the pool for the next.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable

import h11
import trio

from .. import preconnect
from ..sources.base import SourceIdentity
from ..sources.http import READ_TIMEOUT, parse_content_range, redact_url

log = logging.getLogger("incfs.loader")

# How much is read from the socket at a time.
_RECV_SIZE = 64 * 1024


class EarlyRefused(Exception):
    """The early answer is not one to use: ask again through the client."""


class EarlyReader:
    """The answer to a request for `length` bytes at `offset` of `url` on
    one early connection: the request `ask_early` sent (`take`), or one
    this reader sends on a connection still idle (`idle`)."""

    def __init__(self, url: str, length: int, sock: socket.socket,
                 timeout: float = READ_TIMEOUT, *, offset: int = 0, send: bool = False,
                 expect: SourceIdentity | None = None):
        self.url, self.offset, self.length, self.timeout = url, offset, length, timeout
        request = preconnect.range_request(url, length, offset)
        assert request is not None  # early connections are only made for such URLs
        self._request = request
        self._unsent = request if send else b""
        self._sock = trio.socket.from_stdlib_socket(sock)
        # what an earlier answer said about the object: this one must agree
        self.expect = expect
        # what the answer said about the object, once its headers passed
        self.identity: SourceIdentity | None = None
        # called (once) when the reader has to wait for the answer: time the
        # process has free, e.g. to import the HTTP client after all
        self.on_wait: Callable[[], None] | None = None
        self._reusable = False  # the answer was read whole, and the server keeps the connection
        self._conn = self._connection()  # h11's reading of the answer, kept between reads
        self._body = bytearray()
        self._ended = False  # the answer was read to its end
        # read_prefix stopped before the end and kept the connection (keep_rest)
        self.rest_pending = False

    @classmethod
    def take(cls, config, length: int) -> EarlyReader | None:
        """The reader of the answer to `ask_early`'s request for `config`'s
        source, or None when none was sent (or not all of it)."""
        sock = preconnect.take_asked(config.source, length)
        return None if sock is None else cls(config.source, length, sock, _timeout(config))

    @classmethod
    def idle(cls, config, offset: int, length: int,
             expect: SourceIdentity) -> EarlyReader | None:
        """A reader that asks for `length` bytes at `offset` on an early
        connection nobody has used, or None when none is left. Its answer
        must say what `expect` (the first answer's) says of the object:
        anything else is refused (the client then asks, and tells the
        object changed)."""
        sock = preconnect.take_idle(config.source)
        if sock is None:
            return None
        return cls(config.source, length, sock, _timeout(config), offset=offset, send=True,
                   expect=expect)

    async def read_prefix(self, needed: Callable[[bytes], int | None] | None,
                          progress: Callable[[bytearray], None] | None = None, *,
                          keep_rest: bool = False) -> bytes:
        """At least the first `needed(body)` bytes of the range (as
        Source.read_prefix), or all of it (`needed` None, or saying None);
        raises EarlyRefused. `progress`, if given, is called with the body so
        far as it comes in (as Source.read_streaming's). A connection whose
        answer was read to its end and which the server keeps open goes back
        to the early pool (`preconnect.give_back`), for the next early reader
        or the HTTP client; any other is closed. `keep_rest`: when the prefix
        is in before the end, the reader keeps the connection for
        `read_rest` (which gives it back) instead of closing it."""
        kept = False
        try:
            with trio.fail_after(self.timeout):
                prefix = await self._read(needed, progress)
            kept = keep_rest and not self._ended
            return prefix
        except trio.TooSlowError:
            raise EarlyRefused(f"no answer within {self.timeout:g}s") from None
        except (OSError, h11.ProtocolError) as e:
            raise EarlyRefused(str(e) or type(e).__name__) from e
        finally:
            self.rest_pending = kept
            if not kept:
                self._give_back()

    async def read_rest(self) -> bytes | None:
        """After a `read_prefix(keep_rest=True)` that returned before the
        end: the whole body (from the range's start), once the rest of it is
        in, and the connection goes back to the pool. None when it cannot be
        had (a stall past the read timeout, a reset, a body of the wrong
        length): nothing of it is then used, and the connection is closed."""
        if not self.rest_pending:
            return None
        self.rest_pending = False
        self.on_wait = None  # an import now would hold the GIL while reads come in
        try:
            with trio.fail_after(self.timeout):
                return await self._read(None, None)
        except (trio.TooSlowError, OSError, h11.ProtocolError, EarlyRefused) as e:
            log.info("%s: the rest of the first answer is not used (%s)",
                     redact_url(self.url), str(e) or type(e).__name__)
            return None
        finally:
            self._give_back()

    def drop_rest(self) -> None:
        """Close a connection kept for `read_rest` that nobody will read."""
        if self.rest_pending:
            self.rest_pending = False
            self._give_back()

    def _give_back(self) -> None:
        if self._sock.fileno() >= 0:
            preconnect.give_back(self._sock.detach(), self._reusable)

    async def _read(self, needed: Callable[[bytes], int | None] | None,
                    progress: Callable[[bytearray], None] | None) -> bytes:
        """Read the answer on until `needed(body)` bytes are in, or to its
        end; a second call goes on where the first stopped."""
        conn, body = self._conn, self._body
        while self._unsent:
            self._unsent = self._unsent[await self._sock.send(self._unsent):]
        want: int | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if self.on_wait is not None and not self._readable():
                    self.on_wait, on_wait = None, self.on_wait
                    on_wait()
                conn.receive_data(await self._sock.recv(_RECV_SIZE))
            elif isinstance(event, h11.Response):
                self.identity = self._check(event)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.length:
                    raise EarlyRefused(f"body is longer than the {self.length} bytes asked")
                if progress is not None:
                    progress(body)
                if needed is not None and want is None:
                    want = needed(bytes(body))
                if want is not None and len(body) >= want:
                    return bytes(body)
            elif isinstance(event, h11.EndOfMessage):
                if len(body) != self.length:
                    raise EarlyRefused(f"short body, got {len(body)} of {self.length} bytes")
                self._ended = True
                self._reusable = _kept_alive(conn)
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise EarlyRefused(f"connection closed after {len(body)} bytes")
            # an InformationalResponse (1xx) is skipped: the answer follows

    def _readable(self) -> bool:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _connection(self) -> h11.Connection:
        """An h11 client that has "sent" our request (h11 reads an answer by
        the request it answers; the bytes go out as range_request wrote
        them)."""
        head, *lines = self._request.decode("ascii").split("\r\n")
        _, target, _ = head.split(" ")
        headers = [tuple(line.split(": ", 1)) for line in lines if line]
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target=target, headers=headers))
        conn.send(h11.EndOfMessage())
        return conn

    def _check(self, response: h11.Response) -> SourceIdentity:
        """The object's identity from an answer that is a plain 206 of the
        range asked; EarlyRefused for any other."""
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in response.headers}  # h11 gives names lower-cased
        if response.status_code != 206:
            raise EarlyRefused(f"HTTP {response.status_code} to a range request")
        first, last = self.offset, self.offset + self.length - 1
        parsed = parse_content_range(headers.get("content-range"))
        if parsed is None or parsed[:2] != (first, last) or parsed[2] is None:
            raise EarlyRefused(f"Content-Range {headers.get('content-range')!r} "
                               f"for bytes {first}-{last}")
        declared = headers.get("content-length")
        if declared is not None and declared.strip() != str(self.length):
            raise EarlyRefused(f"Content-Length {declared} for a {self.length}-byte range")
        if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            raise EarlyRefused(f"Content-Encoding {headers['content-encoding']!r}")
        identity = SourceIdentity(parsed[2], headers.get("etag"), headers.get("last-modified"))
        if self.expect is not None and identity != self.expect:
            raise EarlyRefused(f"another object than the first answer's ({identity})")
        return identity


def _kept_alive(conn: h11.Connection) -> bool:
    """Whether a connection whose answer h11 read to its end can carry
    another request: the server did not say it closes (HTTP/1.0,
    `Connection: close`) and sent nothing past the answer."""
    leftover, closed = conn.trailing_data
    return (conn.our_state is h11.DONE and conn.their_state is h11.DONE
            and not leftover and not closed)


def _timeout(config) -> float:
    """Seconds an early answer may stall: the source's read timeout."""
    return (config.source_options or {}).get("timeout", READ_TIMEOUT)
