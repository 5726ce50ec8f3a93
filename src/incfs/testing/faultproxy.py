"""A TCP proxy that adds latency, bandwidth caps and faults to a connection.

Why a proxy: the test kernel has no ``netem``, so delay cannot come from tc.
A user-space proxy on loopback also gives faults that tc could never produce
on demand and at an exact byte offset (RST mid-body, clean EOF mid-body, a
flipped byte, a silent stall), which is what the HTTP block source's retry
and integrity paths have to survive.

Design: one asyncio event loop in one daemon thread.  Each connection has two
directions; each direction is a reader task feeding a bounded queue and a
writer task draining it.  Every chunk is stamped ``arrival + delay`` and
released at that time, so delay is a real latency queue: many chunks are in
flight at once and throughput is not limited by the delay (unlike a "sleep
then forward" loop).  A shared token bucket per direction caps bandwidth for
all connections together, like a link would.

Byte offsets used by faults count the *downstream* bytes (server to client,
HTTP headers included) delivered on each connection since it was accepted.
Every setting may be changed at runtime from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

__all__ = ["FaultProxy"]

log = logging.getLogger(__name__)

Direction = Literal["up", "down"]
_CloseMode = Literal["clean", "abort", "reset", "truncate", "refuse"]

_READ_SIZE = 64 * 1024
# Bounded in-flight data per direction and connection (up to 16 MiB): large
# enough for a fat pipe with real delay, small enough to give backpressure.
_QUEUE_CHUNKS = 256
_CONNECT_TIMEOUT_S = 5.0
_SENT_TIMEOUT_S = 2.0
# a hang detector, not a speed limit: on a loaded 2-core machine the loop can
# need seconds to run every connection's cancellation (one CI run took > 5 s)
_STOP_TIMEOUT_S = 30.0
_MIN_BURST = 16 * 1024
_BURST_S = 0.01  # token-bucket depth in seconds of traffic
_PIECE_S = 0.005  # rate-limited sends are split into pieces of this duration
_BROKEN: None = None  # queue marker: the source connection failed


@dataclass
class _Fault:
    """An armed fault: fires at ``offset``; ``remaining`` None means forever."""

    offset: int
    remaining: int | None


class _FaultFired(Exception):
    """Raised by a writer to end the connection with a fault's close mode."""

    def __init__(self, mode: _CloseMode) -> None:
        super().__init__(mode)
        self.mode = mode


class _SourceBroken(Exception):
    """The socket we read from failed (e.g. RST); end both sides abortively."""


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket
    down_pos: int = 0  # downstream bytes delivered so far


class _TokenBucket:
    """Debt-style token bucket, shared by all connections of one direction.

    Tokens may go negative; a sender then sleeps until the debt is repaid.
    This keeps the aggregate rate exact with any number of concurrent senders
    and without a timer task.
    """

    def __init__(self) -> None:
        self._tokens = 0.0
        self._stamp: float | None = None

    async def take(self, nbytes: int, rate: float) -> None:
        now = asyncio.get_running_loop().time()
        burst = max(_MIN_BURST, rate * _BURST_S)
        if self._stamp is None:
            self._tokens = burst
        else:
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        self._tokens -= nbytes
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / rate)


class FaultProxy:
    """TCP proxy from ``listen`` (default 127.0.0.1:<free port>) to ``upstream``.

    Runtime-adjustable attributes (plain assignment, any thread):

    * ``delay_up`` / ``delay_down`` -- one-way delay in seconds (client to
      server / server to client).  Applied to chunks arriving after the change.
    * ``rate_up`` / ``rate_down`` -- bandwidth cap in bytes/s, ``None`` = none.
    * ``connect_delay`` -- seconds to wait before opening the upstream
      connection, to emulate the TCP handshake round trip of a real link.
    * ``refuse`` -- accept new connections and close them at once.

    Faults (``reset_after``, ``truncate_after``, ``corrupt_at``,
    ``hold_after``) take a ``count``: how many times they fire before
    disarming (``None`` = on every connection).  ``stall()`` freezes all
    forwarding until ``unstall()``; ``hold_after`` freezes one connection
    part-way through a response until ``release_held()``.

    Counters: ``bytes_up``, ``bytes_down`` (delivered), ``connections``
    (accepted), ``active_connections``, ``refused``, ``upstream_failures``,
    ``resets``, ``truncations``, ``corruptions``.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        delay_up: float = 0.0,
        delay_down: float = 0.0,
        rate_up: float | None = None,
        rate_down: float | None = None,
        connect_delay: float = 0.0,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.upstream = upstream
        self.delay_up = delay_up
        self.delay_down = delay_down
        self.rate_up = rate_up
        self.rate_down = rate_down
        self.connect_delay = connect_delay
        self.refuse = False
        self._listen = listen
        self._faults: dict[str, _Fault | None] = {"reset": None, "truncate": None, "corrupt": None,
                                                  "hold": None}
        self._released = asyncio.Event()
        self.held = 0  # connections holding their downstream bytes right now
        self._buckets: dict[Direction, _TokenBucket] = {"up": _TokenBucket(), "down": _TokenBucket()}
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stop = asyncio.Event()
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.active_connections = 0
        self.reset_counters()

    # ------------------------------------------------------------------ life
    def start(self) -> Self:
        """Bind the listening socket and start the proxy thread.

        The socket is listening before this returns, so clients may connect
        immediately (the kernel queues them until the loop accepts).
        """
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._listener = socket.create_server(self._listen, backlog=128)
        self._listener.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"faultproxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, kill every connection, join the thread.  Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(self._stop.set)
            thread.join(_STOP_TIMEOUT_S)
        if self._listener is not None:
            self._listener.close()
        self._thread = None
        if thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop in time")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------- addresses
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) clients should connect to."""
        if self._listener is None:
            raise RuntimeError("FaultProxy not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url_host_port(self) -> str:
        """``host:port`` for building URLs, e.g. ``f"http://{p.url_host_port}/x"``."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def url(self, path: str = "") -> str:
        """``http://`` URL of ``path`` through the proxy."""
        return f"http://{self.url_host_port}/{path.lstrip('/')}"

    # --------------------------------------------------------------- control
    def set_rtt(self, rtt_s: float) -> None:
        """Split a round-trip time evenly over both directions."""
        self.delay_up = self.delay_down = rtt_s / 2

    def reset_after(self, nbytes: int, count: int | None = None) -> None:
        """RST the client (SO_LINGER 0) once ``nbytes`` have been delivered."""
        self._arm("reset", nbytes, count)

    def truncate_after(self, nbytes: int, count: int | None = None) -> None:
        """Close the client cleanly (FIN) once ``nbytes`` have been delivered."""
        self._arm("truncate", nbytes, count)

    def corrupt_at(self, offset: int, count: int | None = None) -> None:
        """Invert all bits of the downstream byte at ``offset``."""
        self._arm("corrupt", offset, count)

    def hold_after(self, nbytes: int, count: int | None = None) -> None:
        """Stop forwarding downstream on a connection once ``nbytes`` have
        been delivered on it, until ``release_held()``: the client has the
        first part of a response and waits for the rest (the test of a
        reader served before its whole range is in)."""
        self._in_loop(self._released.clear)
        self._arm("hold", nbytes, count)

    def release_held(self) -> None:
        """Let held connections go on (and later holds pass at once)."""
        self._in_loop(self._released.set)

    def clear_faults(self) -> None:
        """Disarm every fault, unstall and release held connections.  ``refuse`` is left alone."""
        def clear() -> None:
            for kind in self._faults:
                self._faults[kind] = None
            self._flowing.set()
            self._released.set()

        self._in_loop(clear)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open.

        Returns once the loop has seen it, so no chunk starts after return.
        """
        self._in_loop(self._flowing.clear)

    def unstall(self) -> None:
        """Resume forwarding; queued data flows with its original timestamps."""
        self._in_loop(self._flowing.set)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def reset_counters(self) -> None:
        """Zero the traffic and fault counters (not ``active_connections``)."""
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.refused = 0
        self.upstream_failures = 0
        self.resets = 0
        self.truncations = 0
        self.corruptions = 0

    def _arm(self, kind: str, offset: int, count: int | None) -> None:
        if offset < 0 or (count is not None and count < 1):
            raise ValueError("offset must be >= 0 and count >= 1 or None")
        fault = _Fault(offset, count)
        self._in_loop(lambda: self._faults.__setitem__(kind, fault))

    def _in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the proxy loop and wait, so changes are race-free."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive() or threading.current_thread() is thread:
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        if not done.wait(_STOP_TIMEOUT_S):
            raise TimeoutError("FaultProxy loop did not respond")

    # ------------------------------------------------------------ event loop
    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        accept = asyncio.create_task(self._accept_loop())
        await self._stop.wait()
        accept.cancel()
        tasks = [accept, *self._conn_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                client, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("faultproxy accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            task = asyncio.create_task(self._serve(client))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        """Own one client connection from accept to close."""
        self.connections += 1
        self.active_connections += 1
        upstream: socket.socket | None = None
        mode: _CloseMode = "abort"
        try:
            if self.refuse:
                self.refused += 1
                mode = "refuse"
                return
            _nodelay(client)
            upstream = await self._open_upstream()
            mode = await self._run_pipes(_Conn(client, upstream))
        except (OSError, TimeoutError) as exc:
            if upstream is None:
                self.upstream_failures += 1
            log.debug("faultproxy connection failed: %r", exc)
        finally:
            self.active_connections -= 1
            if upstream is not None:
                upstream.close()
            await _close_client(client, mode)

    async def _open_upstream(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self.connect_delay > 0:
            await asyncio.sleep(self.connect_delay)
        host, port = self.upstream
        family, type_, proto, _, addr = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            # asyncio.timeout, not wait_for: 3.11's wait_for returns the
            # result and drops a cancel that lands as the connect completes,
            # and close() then waited forever for that connection's task
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await loop.sock_connect(sock, addr)
            _nodelay(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _run_pipes(self, conn: _Conn) -> _CloseMode:
        """Forward both directions until both hit EOF or one fails/faults."""
        tasks = [asyncio.create_task(self._pipe(conn, "up")), asyncio.create_task(self._pipe(conn, "down"))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in done:
            exc = task.exception()
            if isinstance(exc, _FaultFired):
                return exc.mode
            if exc is not None:
                return "abort"
        return "clean"

    async def _pipe(self, conn: _Conn, direction: Direction) -> None:
        src, dst = (conn.client, conn.upstream) if direction == "up" else (conn.upstream, conn.client)
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(_QUEUE_CHUNKS)
        reader = asyncio.create_task(self._read_into(src, queue, direction))
        try:
            await self._write_from(queue, dst, conn, direction)
        finally:
            reader.cancel()
            await asyncio.wait([reader])

    async def _read_into(
        self, src: socket.socket, queue: asyncio.Queue[tuple[float, bytes | None]], direction: Direction
    ) -> None:
        """Stamp each chunk with its release time; b"" is EOF, None a failure."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data: bytes | None = await loop.sock_recv(src, _READ_SIZE)
            except OSError:
                data = _BROKEN
            delay = self.delay_up if direction == "up" else self.delay_down
            await queue.put((loop.time() + max(0.0, delay), data))
            if not data:
                return

    async def _write_from(
        self,
        queue: asyncio.Queue[tuple[float, bytes | None]],
        dst: socket.socket,
        conn: _Conn,
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            release, data = await queue.get()
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if data is _BROKEN:
                raise _SourceBroken(direction)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            mode: _CloseMode | None = None
            if direction == "down":
                data = await self._hold_at(conn, dst, data)
                data, mode = self._apply_faults(conn, data)
            await self._send(dst, data, conn, direction)
            if mode is not None:
                raise _FaultFired(mode)

    async def _send(self, dst: socket.socket, data: bytes, conn: _Conn, direction: Direction) -> None:
        """Send ``data``, paced by the direction's token bucket if capped."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            rate = self.rate_up if direction == "up" else self.rate_down
            piece = view
            if rate:
                piece = view[: max(1024, int(rate * _PIECE_S))]
                await self._buckets[direction].take(len(piece), rate)
                await self._flowing.wait()
            await loop.sock_sendall(dst, piece)
            if direction == "up":
                self.bytes_up += len(piece)
            else:
                self.bytes_down += len(piece)
                conn.down_pos += len(piece)
            view = view[len(piece):]

    # ---------------------------------------------------------------- faults
    async def _hold_at(self, conn: _Conn, dst: socket.socket, data: bytes) -> bytes:
        """Deliver ``data`` up to an armed hold's offset, then wait to be
        released; return what is still to send."""
        hold = self._faults["hold"]
        end = conn.down_pos + len(data)
        if hold is None or end < hold.offset or not self._fire("hold"):
            return data
        cut = max(0, hold.offset - conn.down_pos)
        await self._send(dst, data[:cut], conn, "down")
        self.held += 1
        try:
            await self._released.wait()
        finally:
            self.held -= 1
        return data[cut:]

    def _apply_faults(self, conn: _Conn, data: bytes) -> tuple[bytes, _CloseMode | None]:
        """Return the part of ``data`` to deliver and the close mode, if any."""
        start, end = conn.down_pos, conn.down_pos + len(data)
        corrupt = self._faults["corrupt"]
        if corrupt is not None and start <= corrupt.offset < end and self._fire("corrupt"):
            buf = bytearray(data)
            buf[corrupt.offset - start] ^= 0xFF
            data = bytes(buf)
            self.corruptions += 1
        cuts = sorted(
            (fault.offset, kind)
            for kind in ("reset", "truncate")
            if (fault := self._faults[kind]) is not None and end >= fault.offset
        )
        for offset, kind in cuts:
            if self._fire(kind):
                if kind == "reset":
                    self.resets += 1
                    return data[: max(0, offset - start)], "reset"
                self.truncations += 1
                return data[: max(0, offset - start)], "truncate"
        return data, None

    def _fire(self, kind: str) -> bool:
        """Consume one shot of fault ``kind``; False if it is not armed."""
        fault = self._faults[kind]
        if fault is None:
            return False
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults[kind] = None
        return True


def _nodelay(sock: socket.socket) -> None:
    """Disable Nagle: the proxy must not add latency of its own."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close_client(sock: socket.socket, mode: _CloseMode) -> None:
    """Close the client socket the way ``mode`` asks for."""
    try:
        if mode == "reset":
            # RST discards unacknowledged data, so wait until the client has
            # the bytes we promised before resetting.
            await _wait_sent(sock)
        if mode in ("reset", "abort"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "truncate":
            sock.shutdown(socket.SHUT_WR)
            _discard_input(sock)  # unread input would turn close() into RST
    except OSError:
        pass
    finally:
        sock.close()


async def _wait_sent(sock: socket.socket) -> None:
    """Wait (bounded) until the kernel send queue is acknowledged (SIOCOUTQ)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _SENT_TIMEOUT_S
    while loop.time() < deadline:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        if struct.unpack("i", raw)[0] == 0:
            return
        await asyncio.sleep(0.002)


def _discard_input(sock: socket.socket) -> None:
    """Read and drop whatever the client already sent (non-blocking)."""
    with contextlib.suppress(OSError):
        while sock.recv(_READ_SIZE):
            pass
