"""`/metrics` over HTTP, inside the mount's trio loop (`--metrics-listen`).

The loop also serves every FUSE request, so a scraper must never be able to
hold it up: each connection has one deadline for reading its request and
writing the answer, the request head is bounded, at most a few connections
are served at once, and an exception in one is logged and ends only that
connection. One request per connection (`Connection: close`): Prometheus
scrapes every few seconds, keep-alive would buy nothing and cost state.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from functools import partial

import trio

from .metrics import CONTENT_TYPE, render

log = logging.getLogger("incfs.metrics")
DEFAULT_HOST = "127.0.0.1"
MAX_REQUEST = 8192  # bytes of request head; a GET from Prometheus is ~200
DEADLINE = 5.0  # seconds to send the request and take the answer
MAX_CONNECTIONS = 16
# A status walks every inode (Image.totals) on the loop that serves FUSE: a
# scrape within this many seconds of the last rendering gets the same text,
# so a scrape storm costs the loop one status a second, not one per scrape
RENDER_INTERVAL = 1.0
# Connections accepted per second at most. Each costs the loop ~0.5 ms of
# CPU however small its answer (accept, task, reads, close), so a client
# scraping back to back took half the loop (a lazy read ran at 0.5x); at
# this pace it can take ~5%. Prometheus needs one every few seconds.
MAX_RATE = 100.0
# accept(2) errors that mean "no room now": wait and try again (as
# trio.serve_listeners does), never end the mount
ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, :PORT or PORT (loopback) -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "", value
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return host or DEFAULT_HOST, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsServer:
    def __init__(self, service):
        self.service = service
        self.connections = 0
        self._body = ""
        self._rendered_at = -RENDER_INTERVAL
        self._next_accept = 0.0

    def body(self) -> str:
        now = time.monotonic()
        if now - self._rendered_at >= RENDER_INTERVAL:
            self._body, self._rendered_at = render(self.service.status()), now
        return self._body

    async def serve(self, listeners: list[trio.SocketListener]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept at most MAX_RATE connections a second; clients beyond that
        wait in the kernel's backlog, costing the loop nothing."""
        async with listener:
            while True:
                await self._pace()
                try:
                    stream = await listener.accept()
                except OSError as e:
                    if e.errno not in ACCEPT_RETRY_ERRNOS:
                        raise
                    log.warning("metrics: accept failed (%s); retrying", os.strerror(e.errno))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._connection, stream)

    async def _pace(self) -> None:
        now = trio.current_time()
        if self._next_accept > now:
            await trio.sleep_until(self._next_accept)
        self._next_accept = max(now, self._next_accept) + 1.0 / MAX_RATE

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            if self.connections >= MAX_CONNECTIONS:
                with trio.move_on_after(DEADLINE):
                    await stream.send_all(_response(503, "too many connections\n"))
                    await _linger(stream)
                return
            self.connections += 1
            try:
                with trio.move_on_after(DEADLINE):
                    await self._answer(stream)
                    await _linger(stream)
            finally:
                self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away: nothing to do
        except Exception:  # noqa: BLE001 - a scrape must never end the mount
            log.exception("metrics connection failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = await _read_head(stream)
        if head is None:
            await stream.send_all(_response(400, "bad request\n"))
            return
        method, path = head
        if method not in ("GET", "HEAD"):
            await stream.send_all(_response(405, "only GET\n", extra="Allow: GET, HEAD\r\n"))
        elif path.split("?", 1)[0] != "/metrics":
            await stream.send_all(_response(404, "not found; try /metrics\n"))
        else:
            body = self.body()
            await stream.send_all(_response(200, body, CONTENT_TYPE, head_only=method == "HEAD"))


async def _linger(stream: trio.SocketStream, limit: int = 1 << 16) -> None:
    """Half-close, then drop what the client still sends (a little, briefly):
    closing with unread bytes makes the kernel send a reset, and the client
    would lose the answer (a 400 for a head that was too long)."""
    await stream.send_eof()
    with trio.move_on_after(1.0):
        while limit > 0:
            chunk = await stream.receive_some(min(limit, 65536))
            if not chunk:
                return
            limit -= len(chunk)


async def _read_head(stream: trio.SocketStream) -> tuple[str, str] | None:
    """(method, path) of the request, or None for garbage, an oversized head
    or a client that closed early. The caller's deadline bounds the wait."""
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer and b"\n\n" not in buffer:
        if len(buffer) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST + 1 - len(buffer) or 1)
        if not chunk:
            return None
        buffer += chunk
    line = bytes(buffer).split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return None
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


def _response(code: int, body: str, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False, extra: str = "") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              503: "Service Unavailable"}[code]
    data = body.encode()
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else data)


def bind(host: str, port: int) -> trio.SocketListener:
    """A listening socket, bound now (synchronously): a port in use or a bad
    address is an error before serving starts, not in the middle of it."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(_bind_plain(host, port)))


def _bind_plain(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_metrics(service, host: str, port: int, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve GET /metrics for `service` until cancelled; `task_status` gets
    the bound (host, port) (port 0 picks a free one)."""
    listener = bind(host, port)
    task_status.started(listener.socket.getsockname()[:2])
    await MetricsServer(service).serve([listener])


def start_metrics(config, service, nursery: trio.Nursery) -> tuple[str, int] | None:
    """The mount's hook: if `config.metrics_listen` is set, bind it and serve
    /metrics in `nursery`; returns the bound (host, port), None when off.

    `incfs mount` checks the address (and that it can be bound) before the
    daemon starts, so a failure here is a race (the port was taken since):
    it is logged and the mount runs without metrics rather than failing
    after the file system is already mounted."""
    if not getattr(config, "metrics_listen", None):
        return None
    try:
        host, port = parse_listen(config.metrics_listen)
        listener = bind(host, port)
    except (OSError, ValueError) as e:
        log.error("metrics not served on %s: %s", config.metrics_listen, e)
        return None
    address = listener.socket.getsockname()[:2]
    if not is_loopback(host):
        log.warning("metrics served on %s:%s, beyond this host", *address)
    log.info("metrics on http://%s:%s/metrics", *address)
    nursery.start_soon(partial(MetricsServer(service).serve, [listener]))
    return address


def check_listen(value: str) -> str:
    """What `incfs mount --metrics-listen` checks up front: the address
    parses and can be bound right now. Raises ValueError or OSError."""
    host, port = parse_listen(value)
    _bind_plain(host, port).close()
    return value
