"""A small HTTP/1.1 server for byte ranges of an image (or a directory).

Enough HTTP for incfs and for tests, with no dependency beyond the standard
library: HEAD and GET, a single `Range: bytes=a-b`, `a-` or `-n` (206 with
Content-Range, 416 when unsatisfiable), keep-alive, ETag / Last-Modified /
If-Range, Accept-Ranges. Multi-range or malformed Range headers are ignored
and answered 200 with the whole file, as RFC 9110 allows.

Every connection runs in its own (non-daemon) thread; `stop()` closes open
keep-alive connections and joins those threads, so tests leak nothing.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import urllib.parse
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, Self

from incfs.errors import UsageError

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
_FULL = None  # "send the whole file"
_UNSATISFIABLE = "unsatisfiable"


class ServerStats:
    """Thread-safe counters: requests handled, body bytes sent, statuses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0
        self.statuses: Counter[int] = Counter()

    def record(self, status: int, sent: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_sent += sent
            self.statuses[status] += 1

    def add_bytes(self, sent: int) -> None:
        with self._lock:
            self.bytes_sent += sent

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "bytes_sent": self.bytes_sent,
                    "statuses": dict(self.statuses)}


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The inclusive (start, end) to send, `_FULL` (None) to ignore the
    header, or `_UNSATISFIABLE`."""
    if header is None:
        return _FULL
    match = _RANGE.fullmatch(header)
    if not match or (match[1] == "" and match[2] == ""):
        return _FULL  # multi-range or malformed: ignore, send everything
    if match[1] == "":  # suffix: the last n bytes
        count = int(match[2])
        if count == 0 or size == 0:
            return _UNSATISFIABLE
        return max(0, size - count), size - 1
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if match[2] and end < start:
        return _FULL  # syntactically invalid: ignore
    if start >= size:
        return _UNSATISFIABLE
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "incfs-serve"
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # idle keep-alive limit
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle plus
        # the client's delayed ACK can add ~40 ms to every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.server.stats.record(status)  # before the client can see the answer
        self.end_headers()

    def _serve(self, body: bool) -> None:
        target = self.server.resolve(self.path)
        if target is None:
            self._send_empty(404)
            return
        try:
            f = open(target, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            self._send_empty(404)
            return
        with f:
            self._serve_file(f, body)

    def _serve_file(self, f: IO[bytes], body: bool) -> None:
        st = os.fstat(f.fileno())
        size = st.st_size
        etag = f'"{st.st_ino:x}-{size:x}-{st.st_mtime_ns:x}"'
        modified = formatdate(st.st_mtime, usegmt=True)
        common = {"Accept-Ranges": "bytes", "ETag": etag, "Last-Modified": modified}
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (etag, modified):
            wanted = None  # the client's copy is stale: send the whole new file
        chosen = parse_range(wanted, size)
        if chosen == _UNSATISFIABLE:
            self._send_empty(416, {**common, "Content-Range": f"bytes */{size}"})
            return
        if chosen is _FULL:
            status, start, count = 200, 0, size
        else:
            assert isinstance(chosen, tuple)
            status, start, count = 206, chosen[0], chosen[1] - chosen[0] + 1
        self.send_response(status)
        for key, value in common.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(count))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + count - 1}/{size}")
        self.server.stats.record(status)
        self.end_headers()
        if body and count:
            # sendfile: zero-copy and no Python loop per chunk.
            sent = self.connection.sendfile(f, start, count)
            self.server.stats.add_bytes(sent)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # joined in server_close(): no leaked threads
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: str, is_dir: bool,
                 verbose: bool, idle_timeout: float) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.root, self.is_dir = root, is_dir
        self.verbose, self.idle_timeout = verbose, idle_timeout
        self.stats = ServerStats()
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closing = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup
        # that can stall for seconds on a machine without a resolver.
        socket.socket.setsockopt(self.socket, socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def resolve(self, raw_path: str) -> str | None:
        """The file a request path names, or None (404). Never escapes root."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path)
        if not self.is_dir:
            return self.root if path == "/" + os.path.basename(self.root) else None
        target = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        inside = target != self.root and os.path.commonpath([self.root, target]) == self.root
        return target if inside and os.path.isfile(target) else None

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(conn)
            closing = self._closing
        if closing:
            _shutdown_quietly(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        """Wake handler threads idling on keep-alive connections."""
        with self._conn_lock:
            self._closing = True
            conns = list(self._connections)
        for conn in conns:
            _shutdown_quietly(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is normal for a range server.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self._closing:
            return
        if self.verbose:
            super().handle_error(request, client_address)


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RangeServer:
    """Serve one file (at `/<basename>`) or a directory tree over HTTP.

    >>> with RangeServer("image.incfs") as srv:   # doctest: +SKIP
    ...     print(srv.url)                         # http://127.0.0.1:PORT/image.incfs
    """

    def __init__(self, path: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
                 *, verbose: bool = False, idle_timeout: float = 30.0) -> None:
        self.path = os.path.realpath(os.fspath(path))
        if not os.path.exists(self.path):
            raise UsageError(f"nothing to serve at {os.fspath(path)!r}")
        self.is_dir = os.path.isdir(self.path)
        self.host, self._port = host, port
        self.verbose, self.idle_timeout = verbose, idle_timeout
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._inline = False  # serve_forever() running in a caller's thread
        self._lock = threading.Lock()

    def _bind(self) -> _Server:
        with self._lock:
            if self._httpd is None:
                self._httpd = _Server((self.host, self._port), self.path, self.is_dir,
                                      self.verbose, self.idle_timeout)
            return self._httpd

    @property
    def port(self) -> int:
        """The bound port (binds now if needed, so port=0 resolves)."""
        return int(self._bind().server_address[1])

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """URL of the served file (of the root, when serving a directory)."""
        if self.is_dir:
            return self.base_url
        return self.base_url + urllib.parse.quote(os.path.basename(self.path))

    def url_for(self, relative: str) -> str:
        """URL of a file under a served directory."""
        return self.base_url + urllib.parse.quote(relative.lstrip("/"))

    @property
    def stats(self) -> ServerStats:
        return self._bind().stats

    def start(self) -> Self:
        """Serve in a background thread; returns self."""
        httpd = self._bind()
        if self._thread is None:
            self._thread = threading.Thread(target=httpd.serve_forever,
                                            kwargs={"poll_interval": 0.2},
                                            name=f"incfs-serve:{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until KeyboardInterrupt (or stop() elsewhere)."""
        httpd = self._bind()
        with self._lock:
            self._inline = True
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            with self._lock:
                self._inline = False
                mine = self._httpd is httpd  # else stop() is cleaning up
                if mine:
                    self._httpd = None
            if mine:
                self._close(httpd)

    def stop(self) -> None:
        """Stop serving, close connections, join every thread. Idempotent."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
            thread, self._thread = self._thread, None
            serving = thread is not None or self._inline
        if httpd is None:
            return
        if serving:
            httpd.shutdown()  # blocks until serve_forever returns; only valid then
        if thread is not None:
            thread.join()
        self._close(httpd)

    @staticmethod
    def _close(httpd: _Server) -> None:
        httpd.close_connections()
        httpd.server_close()  # joins the per-connection threads

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_server(path: str, port: int = 0, host: str = "127.0.0.1", *,
               verbose: bool = False) -> None:
    """`incfs serve IMAGE --port N`: print the URL, serve until Ctrl-C.
    `verbose` logs each request to stderr (quiet by default)."""
    server = RangeServer(path, host=host, port=port, verbose=verbose)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
