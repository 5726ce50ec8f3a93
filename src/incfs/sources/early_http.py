"""httpx's connection pool, given the connections `preconnect` opened early.

httpx makes its own connections (through httpcore) and has no option to be
handed one. httpcore does take a network backend, so this module has one:
`connect_tcp` to a host and port with an early connection takes it (waiting
for its handshake if that is still on the wire) and falls back to trio's
normal connect otherwise, and for every later connection. The stream class
is the small adapter httpcore asks for: reads, writes, TLS over it, and the
socket details httpcore queries (`ssl_object` for HTTP/2, `is_readable` to
tell a dropped idle connection).

Imported only by `sources.http`, and only when early connections exist.
"""

from __future__ import annotations

import math
import socket
import ssl
from typing import Any

import httpcore
import httpx
import trio

from .. import preconnect


class _Stream(httpcore.AsyncNetworkStream):
    """A trio stream (a socket, or TLS over one) as httpcore wants it, with
    trio's errors turned into httpcore's."""

    def __init__(self, stream: trio.abc.Stream, asked: bytes = b"",
                 address: tuple[str, int] | None = None):
        self._stream = stream
        # a request preconnect.ask_early sent on this connection: the first
        # write is expected to begin with it (see `write`)
        self._asked, self._address = asked, address

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            with trio.fail_after(_seconds(timeout)):
                return await self._stream.receive_some(max_bytes)
        except trio.TooSlowError as e:
            raise httpcore.ReadTimeout(str(e)) from e
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise httpcore.ReadError(str(e)) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._asked:
            buffer = await self._after_asked(buffer, timeout)
        if not buffer:
            return
        try:
            with trio.fail_after(_seconds(timeout)):
                await self._stream.send_all(buffer)
        except trio.TooSlowError as e:
            raise httpcore.WriteTimeout(str(e)) from e
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise httpcore.WriteError(str(e)) from e

    async def _after_asked(self, buffer: bytes, timeout: float | None) -> bytes:
        """What is left to send of the first request on a connection that
        already carries one (preconnect.ask_early): nothing, when it is that
        request (its answer is on the way); else the answer coming is to
        another request, so the connection is replaced by a fresh one."""
        asked, self._asked = self._asked, b""
        if buffer.startswith(asked):
            return buffer[len(asked):]
        await self._stream.aclose()
        assert self._address is not None
        try:
            with trio.fail_after(_seconds(timeout)):
                self._stream = await trio.open_tcp_stream(*self._address)
        except (trio.TooSlowError, OSError) as e:
            raise httpcore.WriteError(str(e)) from e
        return buffer

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname,
                             https_compatible=True)
        try:
            with trio.fail_after(_seconds(timeout)):
                await tls.do_handshake()
        except trio.TooSlowError as e:
            await self.aclose()
            raise httpcore.ConnectTimeout(str(e)) from e
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as e:
            await self.aclose()
            raise httpcore.ConnectError(str(e)) from e
        return _Stream(tls)

    def get_extra_info(self, info: str) -> Any:
        sock = self._socket()
        if info == "ssl_object" and isinstance(self._stream, trio.SSLStream):
            return self._stream._ssl_object  # trio exposes the SSLObject only so
        if info == "socket":
            return sock
        if info == "client_addr":
            return sock.getsockname()
        if info == "server_addr":
            return sock.getpeername()
        if info == "is_readable":
            return sock.is_readable()
        return None

    def _socket(self) -> Any:
        stream = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket


def _seconds(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout


class EarlyConnections(httpcore.AsyncNetworkBackend):
    """trio's network backend, but a connection opened early is used first."""

    def __init__(self) -> None:
        self._trio = httpcore.TrioBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        while (early := preconnect.take(host, port)) is not None:
            asked = preconnect.asked(early.fileno())
            stream = await _finish_connect(early, timeout)
            if stream is not None:
                return _Stream(stream, asked, (host, port))
        return await self._trio.connect_tcp(host, port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return await self._trio.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


async def _finish_connect(sock: socket.socket, timeout: float | None) -> trio.SocketStream | None:
    """The early connection once its handshake is done; None (closed) when
    it failed or takes longer than `timeout`: a normal connect then says
    what is wrong."""
    tsock = trio.socket.from_stdlib_socket(sock)
    with trio.move_on_after(_seconds(timeout)):
        await trio.lowlevel.wait_writable(tsock)
        if tsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            return trio.SocketStream(tsock)
    tsock.close()
    return None


class EarlyTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the pool built on `EarlyConnections`.

    httpx keeps its pool in `_pool` and offers no way to give it a network
    backend; the pool is made again with one, with the settings httpx was
    given (no proxy: `preconnect` opens nothing when one is configured).
    tests/test_sources.py checks that a request really goes over an early
    connection, so an httpx that changes this fails there, not in the field."""

    def __init__(self, *, ssl_context: ssl.SSLContext, http2: bool, limits: httpx.Limits):
        super().__init__(verify=ssl_context, http2=http2, limits=limits)
        if type(self._pool) is httpcore.AsyncConnectionPool:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=ssl_context, max_connections=limits.max_connections,
                max_keepalive_connections=limits.max_keepalive_connections,
                keepalive_expiry=limits.keepalive_expiry, http1=True, http2=http2,
                network_backend=EarlyConnections())
