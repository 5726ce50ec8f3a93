"""Tests for incfs.sources and incfs.serve, against real servers only.

HTTP tests talk to `RangeServer` and to a deliberately misbehaving stdlib
server defined here; S3 tests talk to moto's standalone server (no real S3
implementation is installable in this environment). Everything listens on
127.0.0.1 and is stopped (threads joined) at the end of its fixture.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
import trio

from incfs.errors import UsageError
from incfs.serve import RangeServer
from incfs.sources import (
    HttpSource,
    LocalSource,
    MirroredSource,
    NotFoundError,
    ObjectChangedError,
    PermanentSourceError,
    RangeNotSatisfiableError,
    RetryPolicy,
    S3Source,
    Source,
    TransientSourceError,
    open_source,
)

T = TypeVar("T")
SIZE = (1 << 20) + 12345  # not a multiple of anything convenient
DATA = random.Random(1234).randbytes(SIZE)
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, deadline=15.0)
RANGES = [(0, 1), (SIZE - 1, 1), (4096, 4096), (12345, 65536), (SIZE - 5000, 5000)]


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """pytest-trio is not installed: run one async test body with trio."""
    return trio.run(fn)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("img") / "image.bin"
    path.write_bytes(DATA)
    return str(path)


@pytest.fixture(scope="module")
def server(image: str) -> Iterator[RangeServer]:
    with RangeServer(image) as srv:
        yield srv


def free_port() -> int:
    """A port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def check_reads(src: Source) -> None:
    assert await src.size() == SIZE
    for offset, length in RANGES:
        assert await src.read(offset, length) == DATA[offset:offset + length]
    assert await src.read(100, 0) == b""


# -- local ------------------------------------------------------------------


def test_local_reads(image: str) -> None:
    async def main() -> None:
        async with open_source(image) as src:
            assert isinstance(src, LocalSource)
            await check_reads(src)
            got = await src.read_many(RANGES)
            assert got == [DATA[o:o + n] for o, n in RANGES]
            with pytest.raises(RangeNotSatisfiableError):
                await src.read(SIZE - 10, 11)
            with pytest.raises(UsageError):
                await src.read(-1, 10)
            assert src.stats.bytes == 2 * sum(n for _, n in RANGES)
        async with open_source(image + ".missing") as missing:
            with pytest.raises(NotFoundError):
                await missing.size()

    run(main)


def test_local_detects_rewrite(tmp_path: Any) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)

    async def main() -> None:
        async with LocalSource(path) as src:
            assert await src.read(0, 10) == b"a" * 10
            with open(path, "r+b") as f:
                f.write(b"b" * 10)
            os.utime(path, ns=(1, 1))  # mtime granularity must not hide the write
            with pytest.raises(ObjectChangedError):
                await src.read(0, 10)

    run(main)


# -- RangeServer itself -----------------------------------------------------


def test_range_server_protocol(server: RangeServer) -> None:
    """Range forms, 416, HEAD headers, If-Range and keep-alive, by hand."""
    path = "/image.bin"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        def get(headers: dict[str, str], method: str = "GET") -> http.client.HTTPResponse:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            resp.read()  # keep the connection usable
            return resp

        head = get({}, "HEAD")
        assert head.status == 200 and int(head.headers["Content-Length"]) == SIZE
        assert head.headers["Accept-Ranges"] == "bytes"
        etag, modified = head.headers["ETag"], head.headers["Last-Modified"]
        assert etag and modified

        cases = {"bytes=10-19": (10, 19), f"bytes={SIZE - 3}-": (SIZE - 3, SIZE - 1),
                 "bytes=-7": (SIZE - 7, SIZE - 1), f"bytes=5-{SIZE * 2}": (5, SIZE - 1)}
        for header, (start, end) in cases.items():
            conn.request("GET", path, headers={"Range": header})
            resp = conn.getresponse()
            assert resp.status == 206, header
            assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{SIZE}"
            assert resp.read() == DATA[start:end + 1]

        bad = get({"Range": f"bytes={SIZE}-"})
        assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{SIZE}"
        assert get({"Range": "bytes=0-0", "If-Range": etag}).status == 206
        assert get({"Range": "bytes=0-0", "If-Range": '"stale"'}).status == 200
        assert get({"Range": "bytes=0-1,5-6"}).status == 200  # multi-range: ignored
        conn.request("GET", "/other")
        missing = conn.getresponse()
        missing.read()
        assert missing.status == 404
    finally:
        conn.close()
    assert server.stats.requests >= 10


def test_range_server_directory_and_threads(tmp_path: Any) -> None:
    """Directory mode refuses traversal; stop() joins idle keep-alive threads."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"hello")
    before = set(threading.enumerate())
    srv = RangeServer(tmp_path / "sub").start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.request("GET", "/a.bin", headers={"Range": "bytes=1-3"})
        assert conn.getresponse().read() == b"ell"
        for evil in ("/../sub/a.bin/..", "/%2e%2e/etc/passwd", "/"):
            conn.request("GET", evil)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404, evil
        srv.stop()  # the connection is still open: its thread must not survive
    finally:
        conn.close()
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


# -- HTTP -------------------------------------------------------------------


def test_http_reads(server: RangeServer) -> None:
    async def main() -> None:
        async with open_source(server.url, retry=FAST) as src:
            assert isinstance(src, HttpSource)
            await check_reads(src)
            assert await src.read(0, SIZE) == DATA  # whole object as a range
            with pytest.raises(RangeNotSatisfiableError):
                await src.read(SIZE - 1, 2)
            assert src.stats.errors == 0
        async with HttpSource(server.url + ".nope", retry=FAST) as missing:
            with pytest.raises(NotFoundError):
                await missing.read(0, 10)

    run(main)


def test_http_prefix_read_stops_once_the_caller_has_enough(server: RangeServer) -> None:
    """A mount reads its metadata so: it learns the length from the first
    bytes, and the rest of the range is not waited for."""
    def needed(head: bytes) -> int | None:
        return 5000 if len(head) >= 16 else None

    async def main() -> None:
        async with HttpSource(server.url, retry=FAST) as src:
            head = await src.read_prefix(0, SIZE, needed)
            assert 5000 <= len(head) < SIZE and head == DATA[:len(head)]
            whole = await src.read_prefix(0, SIZE, lambda _: None)  # it never can tell
            assert whole == DATA
            assert await src.read(SIZE - 10, 10) == DATA[-10:]  # after a dropped connection

    run(main)


_PRELOAD_THEN_READ = """
import os, sys, trio
from incfs import sources
specs = sys.argv[1:]
sources.preload(specs)

async def main():
    async with sources.HttpSource(specs[0]) as src:
        with open(os.environ["IMAGE"], "rb") as f:
            assert await src.read(0, 10) == f.read(10)

trio.run(main)
print("h2" if sys.modules.get("h2") is not None else "no h2")
"""


def test_preload_of_plain_http_sources_leaves_http2_out(server: RangeServer, image: str) -> None:
    """httpx never speaks HTTP/2 to an http:// server: a mount of such
    sources does not import h2 (~8 ms of its start); one of https does."""
    import subprocess
    import sys

    def run_with(*specs: str) -> str:
        return subprocess.run([sys.executable, "-c", _PRELOAD_THEN_READ, *specs], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "IMAGE": image}).stdout.strip()

    assert run_with(server.url) == "no h2"
    assert run_with(server.url, "https://mirror.invalid/image") == "h2"


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by itself: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "incfs test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def tls_server(image: str, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """The image over https with a self-signed certificate: (URL, cert.pem)."""
    import ssl

    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = RangeServer(image)
    httpd = srv._bind()
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    with srv:
        yield srv.url.replace("http://", "https://", 1), cert


@pytest.fixture
def fresh_trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """A function that makes the process-wide TLS contexts again under the
    environment it is given; the contexts made under it go at teardown."""
    from incfs.sources import http

    def under(**env: str) -> None:
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        http._ssl_context.cache_clear()

    yield under
    http._ssl_context.cache_clear()


def test_https_verifies_the_server_against_the_trusted_bundle(
        tls_server: tuple[str, str], fresh_trust: Callable[..., None]) -> None:
    url, cert = tls_server

    async def reads() -> None:
        async with HttpSource(url, retry=FAST) as src:
            await check_reads(src)

    from incfs.sources import http

    fresh_trust(SSL_CERT_FILE=cert)
    run(reads)
    assert http._ssl_context(True).cert_store_stats()["x509_ca"] == 1  # loaded at the handshake
    fresh_trust()  # certifi's bundle: it does not know this certificate
    with pytest.raises(PermanentSourceError, match="certificate is not trusted.*self.signed"):
        run(reads)


def test_plain_http_never_parses_the_ca_bundle(server: RangeServer,
                                               fresh_trust: Callable[..., None]) -> None:
    """Parsing it is ~15 ms of every mount's start; an http:// mount never
    needs it (the context waits for a handshake that never comes)."""
    from incfs.sources import http

    fresh_trust()

    async def main() -> None:
        async with HttpSource(server.url, retry=FAST) as src:
            await check_reads(src)

    run(main)
    assert http._ssl_context(True).cert_store_stats()["x509_ca"] == 0


# -- connections opened early (incfs.preconnect, sources.early_http) -----------


@pytest.fixture
def early(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int], list[int]]]:
    """open_early in this process, then adopted by it (as a mount's daemon
    adopts what mount_background opened): returns the descriptors."""
    from incfs import preconnect

    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)

    def open_and_adopt(url: str, count: int) -> list[int]:
        env, fds = preconnect.open_early(url, count)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        preconnect.adopt()
        return fds

    yield open_and_adopt
    preconnect.discard()


def _proxy_to(server: RangeServer):
    from incfs.testing.faultproxy import FaultProxy

    host, port = server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return FaultProxy((host, int(port)))


def test_requests_go_over_the_connections_opened_early(
        server: RangeServer, early: Callable[[str, int], list[int]]) -> None:
    """Two reads at once take the two early connections: the proxy sees no
    third one (httpx's pool really uses them: see early_http.EarlyTransport)."""
    from incfs import preconnect

    with _proxy_to(server) as proxy:
        url = proxy.url("/" + server.url.rsplit("/", 1)[1])
        early(url, 2)

        async def main() -> None:
            async with HttpSource(url, retry=FAST) as src:
                assert src.preconnected == 2
                got: dict[int, bytes] = {}

                async def one(offset: int) -> None:
                    got[offset] = await src.read(offset, 70000)

                async with trio.open_nursery() as nursery:
                    for offset in (0, 500000):
                        nursery.start_soon(one, offset)
                assert got == {o: DATA[o:o + 70000] for o in (0, 500000)}
                await check_reads(src)

        run(main)
        assert proxy.connections == 2
        assert preconnect.available("127.0.0.1", proxy.port) == 0


def test_an_early_connection_carries_tls(tls_server: tuple[str, str],
                                         fresh_trust: Callable[..., None],
                                         early: Callable[[str, int], list[int]]) -> None:
    url, cert = tls_server
    fresh_trust(SSL_CERT_FILE=cert)
    early(url, 1)

    async def main() -> None:
        async with HttpSource(url, retry=FAST) as src:
            assert src.preconnected == 1
            await check_reads(src)

    run(main)


def test_a_stale_or_failed_early_connection_gives_way_to_a_normal_one(
        server: RangeServer, early: Callable[[str, int], list[int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from incfs import preconnect

    host_port = server.url.split("//", 1)[1].split("/", 1)[0]
    early(f"http://{host_port}/", 1)
    monkeypatch.setattr(preconnect, "MAX_AGE", -1.0)  # every one is too old now

    async def main() -> None:
        async with HttpSource(server.url, retry=FAST) as src:
            await check_reads(src)

    run(main)
    refused = f"http://127.0.0.1:{free_port()}/x"
    monkeypatch.setattr(preconnect, "MAX_AGE", 10.0)
    early(refused, 1)  # its handshake fails: a normal connect says why

    async def fails() -> None:
        async with HttpSource(refused, retry=FAST) as src:
            await src.read(0, 1)

    with pytest.raises(TransientSourceError, match="refused|connect"):
        run(fails)


def test_nothing_is_opened_early_through_a_proxy_or_for_other_schemes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from incfs import preconnect

    assert preconnect.open_early("s3://bucket/key", 4) == ({}, [])
    assert preconnect.open_early("/some/path.img", 4) == ({}, [])
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert preconnect.open_early("https://127.0.0.1:1/x", 4) == ({}, [])


def _connected(fds: list[int], timeout: float = 5.0) -> None:
    """Until every early connection's handshake is done."""
    import select

    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLOUT)
    assert len(poller.poll(timeout * 1000)) == len(fds)


def test_a_request_sent_early_is_the_clients_first(
        server: RangeServer, early: Callable[[str, int], list[int]]) -> None:
    """preconnect.ask_early sends the first read's request on the first early
    connection; the client, writing the same bytes, sends nothing more and
    reads that answer: the server sees one request, over one connection."""
    from incfs import preconnect

    with _proxy_to(server) as proxy:
        url = proxy.url("/" + server.url.rsplit("/", 1)[1])
        before = server.stats.requests  # (the server serves other tests too)
        _connected(early(url, 2))
        assert preconnect.ask_early(url, 70000)
        assert preconnect.ask_early(url, 70000)  # once: nothing more is sent

        async def main() -> None:
            async with HttpSource(url, retry=FAST) as src:
                assert await src.read(0, 70000) == DATA[:70000]
                assert server.stats.requests - before == 1
                assert await src.read(90000, 10) == DATA[90000:90010]  # the same one, kept alive

        run(main)
        assert server.stats.requests - before == 2
        assert proxy.connections == 2  # the two opened early, no other


def test_another_first_request_than_the_one_sent_early_gets_a_fresh_connection(
        server: RangeServer, early: Callable[[str, int], list[int]]) -> None:
    """The answer coming on a connection asked early is to that request:
    a client whose first request differs sends it on a new connection and
    never takes that answer for its own."""
    from incfs import preconnect

    with _proxy_to(server) as proxy:
        url = proxy.url("/" + server.url.rsplit("/", 1)[1])
        _connected(early(url, 1))
        assert preconnect.ask_early(url, 1000)

        async def main() -> None:
            async with HttpSource(url, retry=FAST) as src:
                assert await src.read(5000, 100) == DATA[5000:5100]
                assert await src.read(0, 1000) == DATA[:1000]
                assert src.stats.retries == 0

        run(main)
        assert proxy.connections == 2  # the one opened early, and a fresh one


def test_nothing_is_asked_early_before_the_handshake_or_for_other_urls(
        server: RangeServer, early: Callable[[str, int], list[int]]) -> None:
    from incfs import preconnect

    host_port = server.url.split("//", 1)[1].split("/", 1)[0]
    assert not preconnect.ask_early(f"http://{host_port}/x", 100)  # nothing opened early
    unanswered = socket.socket()
    unanswered.bind(("127.0.0.1", 0))  # bound, never listening: a SYN gets no answer here
    try:
        stalled = f"http://127.0.0.1:{unanswered.getsockname()[1]}/x"
        early(stalled, 1)
        assert not preconnect.ask_early(stalled, 100)  # refused or still on the wire
    finally:
        unanswered.close()
    assert not preconnect.ask_early("https://127.0.0.1:1/x", 100)


def test_only_tcp_sockets_named_by_the_variable_are_adopted(
        server: RangeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable names our parent's descriptors; a number that is now a
    pipe, or nothing, is left alone. hand_over closes the parent's copies."""
    from incfs import preconnect

    read_end, write_end = os.pipe()
    closed = os.dup(read_end)
    os.close(closed)
    try:
        monkeypatch.setenv(preconnect.ENV, f"127.0.0.1 80 0 {read_end},{closed}")
        preconnect.adopt()
        assert preconnect.ENV not in os.environ
        assert preconnect.available("127.0.0.1", 80) == 0
        os.fstat(read_end)  # still ours, untouched
    finally:
        os.close(read_end)
        os.close(write_end)
    host_port = server.url.split("//", 1)[1].split("/", 1)[0]
    env, fds = preconnect.open_early(f"http://{host_port}/", 2)
    assert len(fds) == 2
    monkeypatch.setenv(preconnect.ENV, env[preconnect.ENV])
    ours = {fd: os.fstat(fd).st_ino for fd in fds}
    preconnect.hand_over()
    assert preconnect.ENV not in os.environ
    for fd in fds:
        # closed; the number may already be reused (the server's thread
        # accepting these very connections gets the lowest free one), but
        # then by another socket
        with contextlib.suppress(OSError):
            assert os.fstat(fd).st_ino != ours[fd], f"fd {fd} is still our connection"


def test_http_many_concurrent_ranges(server: RangeServer) -> None:
    rng = random.Random(7)
    ranges = []
    for _ in range(300):
        offset = rng.randrange(SIZE)
        ranges.append((offset, rng.randint(1, min(70000, SIZE - offset))))

    async def main() -> None:
        async with HttpSource(server.url, max_connections=8, retry=FAST) as src:
            got = await src.read_many(ranges)
            assert got == [DATA[o:o + n] for o, n in ranges]
            assert src.stats.requests == len(ranges)
            assert src.stats.bytes == sum(n for _, n in ranges)

    run(main)


def test_http_object_changed(tmp_path: Any) -> None:
    path = tmp_path / "obj.bin"
    path.write_bytes(DATA[:10000])

    async def main(url: str) -> None:
        async with HttpSource(url, retry=FAST) as src:
            assert await src.read(0, 100) == DATA[:100]
            path.write_bytes(DATA[1:10001])  # same size, new content and ETag
            os.utime(path, ns=(10**18, 10**18))
            with pytest.raises(ObjectChangedError):
                await src.read(0, 100)

    with RangeServer(path) as srv:
        trio.run(main, srv.url)


# -- a misbehaving server ---------------------------------------------------


class BadHandler(BaseHTTPRequestHandler):
    """Serves DATA, misbehaving according to the first path segment."""

    protocol_version = "HTTP/1.1"
    server: BadServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        if self.path.startswith("/nohead"):
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        hits = self.server.hit(mode)
        start, end = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        if mode == "full200":
            return self.reply(200, DATA)
        if mode == "wrongrange":
            return self.reply(206, DATA[start + 1:end + 2], f"bytes {start + 1}-{end + 1}/{SIZE}")
        if mode == "short":  # promises the full length, sends half, hangs up
            self.reply_head(206, end - start + 1, f"bytes {start}-{end}/{SIZE}")
            self.wfile.write(DATA[start:start + (end - start + 1) // 2])
            self.close_connection = True
            return None
        if mode == "shortdeclared":  # consistent headers, but fewer bytes than asked
            return self.reply(206, DATA[start:end - 9], f"bytes {start}-{end}/{SIZE}")
        if mode == "flaky503" and hits <= 2:
            return self.reply(503, b"busy")
        if mode == "reset" or (mode == "resetonce" and hits == 1):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()  # RST instead of an answer
            self.close_connection = True
            return None
        return self.reply(206, DATA[start:end + 1], f"bytes {start}-{end}/{SIZE}")

    def reply_head(self, status: int, length: int, content_range: str | None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()

    def reply(self, status: int, body: bytes, content_range: str | None = None) -> None:
        self.reply_head(status, len(body), content_range)
        self.wfile.write(body)


class BadServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), BadHandler)
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()

    def hit(self, mode: str) -> int:
        with self.lock:
            self.hits[mode] = self.hits.get(mode, 0) + 1
            return self.hits[mode]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and hang-ups are the point here


@pytest.fixture
def bad() -> Iterator[str]:
    srv = BadServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        thread.join()
        srv.server_close()


def bad_read(url: str, offset: int = 100, length: int = 1000) -> tuple[bytes | Exception, Any]:
    """Read once through a fresh HttpSource; return (bytes or error, stats)."""
    async def main() -> tuple[bytes | Exception, Any]:
        async with HttpSource(url, retry=FAST, timeout=5.0) as src:
            try:
                return await src.read(offset, length), src.stats
            except Exception as exc:  # noqa: BLE001 (returned for inspection)
                return exc, src.stats

    return run(main)


def test_http_rejects_200_with_whole_body(bad: str) -> None:
    result, stats = bad_read(bad + "/full200/x")
    assert isinstance(result, PermanentSourceError) and "ignored the Range" in str(result)
    assert stats.requests == 1  # permanent: not retried
    whole, _ = bad_read(bad + "/full200/x", 0, SIZE)  # asking for everything: fine
    assert whole == DATA


def test_http_rejects_wrong_content_range(bad: str) -> None:
    result, _ = bad_read(bad + "/wrongrange/x")
    assert isinstance(result, PermanentSourceError) and "Content-Range" in str(result)


def test_http_short_body_is_transient(bad: str) -> None:
    for mode in ("short", "shortdeclared"):
        result, stats = bad_read(f"{bad}/{mode}/x")
        assert isinstance(result, TransientSourceError), mode
        assert stats.requests == FAST.max_attempts and stats.retries == FAST.max_attempts - 1


def test_http_503_then_ok_is_retried(bad: str) -> None:
    result, stats = bad_read(bad + "/flaky503/x")
    assert result == DATA[100:1100]
    assert (stats.requests, stats.errors, stats.retries) == (3, 2, 2)


def test_http_connection_reset(bad: str) -> None:
    result, stats = bad_read(bad + "/resetonce/x")
    assert result == DATA[100:1100] and stats.retries == 1
    result, stats = bad_read(bad + "/reset/x")
    assert isinstance(result, TransientSourceError) and stats.errors == FAST.max_attempts


def test_http_size_without_head(bad: str) -> None:
    async def main() -> None:
        async with HttpSource(bad + "/nohead/x", retry=FAST) as src:
            assert await src.size() == SIZE

    run(main)


def test_retry_deadline_bounds_a_hanging_attempt() -> None:
    from incfs.sources.retry import call_with_retry

    async def hang() -> None:
        await trio.sleep(60)

    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(TransientSourceError, match="deadline"):
            await call_with_retry(RetryPolicy(deadline=0.2), hang, name="x")
        assert trio.current_time() - start < 5

    run(main)


def test_backoff_is_full_jitter_within_bounds() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0)
    rng = random.Random(3)
    for n in range(100):
        ceiling = min(2.0, 0.1 * 2**n)
        assert all(0.0 <= policy.backoff(n, rng) <= ceiling for _ in range(20))


def test_open_source_dispatch(image: str) -> None:
    assert isinstance(open_source("file://" + image), LocalSource)
    assert isinstance(open_source("s3://bucket/a/b.img"), S3Source)
    assert isinstance(open_source(["http://127.0.0.1:1/x"]), HttpSource)  # one mirror
    with pytest.raises(UsageError):
        open_source("ftp://host/x")
    with pytest.raises(UsageError):
        open_source("s3://bucket-without-key")
    with pytest.raises(UsageError, match="unknown source option"):
        open_source(image, heders={"x": "y"})


# -- mirrors ----------------------------------------------------------------


def quick_mirrors(urls: list[str], cooldown: float = 30.0) -> MirroredSource:
    src = open_source(urls, cooldown=cooldown, retry=FAST,
                      mirror_retry=RetryPolicy(max_attempts=1, deadline=10.0))
    assert isinstance(src, MirroredSource)
    return src


def test_mirror_dead_first_second_serves(server: RangeServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/image.bin"

    async def main() -> None:
        async with quick_mirrors([dead, server.url]) as src:
            await check_reads(src)
            data, origin = await src.read_with_origin(10, 10)
            assert (data, origin) == (DATA[10:20], 1)
            status = src.mirror_stats()
            assert not status[0]["healthy"] and status[0]["failures"] == 1
            assert status[1]["healthy"] and status[1]["bytes"] > 0
            assert src.stats.retries == 1  # one fail-over, then mirror 0 was skipped

    run(main)


def test_mirror_back_to_first_after_cooldown(image: str, server: RangeServer) -> None:
    first = RangeServer(image).start()
    port = first.port

    async def main() -> None:
        nonlocal first
        async with quick_mirrors([first.url, server.url], cooldown=0.3) as src:
            assert (await src.read_with_origin(0, 100))[1] == 0
            first.stop()
            assert await src.read_with_origin(0, 100) == (DATA[:100], 1)
            requests_before = src.mirrors[0].source.stats.requests
            assert (await src.read_with_origin(0, 100))[1] == 1  # cooling: not tried
            assert src.mirrors[0].source.stats.requests == requests_before
            first = RangeServer(image, port=port).start()
            await trio.sleep(0.35)
            assert src.active == 0
            assert await src.read_with_origin(500, 100) == (DATA[500:600], 0)

    try:
        run(main)
    finally:
        first.stop()


def test_mirror_read_from_other(image: str, server: RangeServer) -> None:
    with RangeServer(image) as second:
        async def main() -> None:
            async with quick_mirrors([server.url, second.url]) as src:
                assert (await src.read_with_origin(0, 10))[1] == 0
                assert await src.read_with_origin(0, 10, avoid=0) == (DATA[:10], 1)
                assert await src.read(0, 10, avoid=server.url) == DATA[:10]
                data, origin = await src.read_from_other(4096, 4096, avoid=0)
                assert (data, origin) == (DATA[4096:8192], 1)
                assert src.active == 1  # the mirror that served bad data is demoted
                with pytest.raises(PermanentSourceError):
                    await src.read_from_other(0, 10, avoid=[0, 1])

        run(main)


def test_mirror_of_other_size_is_refused(tmp_path: Any, server: RangeServer) -> None:
    stale = tmp_path / "image.bin"
    stale.write_bytes(DATA[:1000])
    with RangeServer(stale) as wrong:
        async def main() -> None:
            async with quick_mirrors([server.url, wrong.url]) as src:
                assert await src.size() == SIZE
                with pytest.raises(PermanentSourceError, match="expected"):
                    await src.read(0, 10, avoid=0)
                assert await src.read(0, 10) == DATA[:10]

        run(main)


# -- S3 (moto) --------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """No real S3 server is installable here, so this runs against moto's
    standalone server (a real HTTP server on 127.0.0.1, not a mock of boto).
    Credentials come from the environment, the way S3Source finds them."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        try:
            host, port = moto.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket="images")
            client.put_object(Bucket="images", Key="dir/image.bin", Body=DATA)
            client.close()
            yield {"endpoint_url": endpoint, "bucket": "images", "key": "dir/image.bin"}
        finally:
            moto.stop()
            if moto._server is not None:
                moto._server.server_close()


def test_s3_reads(s3: dict[str, str]) -> None:
    async def main() -> None:
        src = open_source(f"s3://{s3['bucket']}/{s3['key']}", endpoint_url=s3["endpoint_url"],
                          region="us-east-1", retry=FAST)
        async with src:
            assert isinstance(src, S3Source)
            await check_reads(src)
            assert await src.read_many(RANGES) == [DATA[o:o + n] for o, n in RANGES]
            with pytest.raises(RangeNotSatisfiableError):
                await src.read(SIZE - 1, 2)
            assert src.stats.errors == 0
        async with S3Source(s3["bucket"], "nope", endpoint_url=s3["endpoint_url"],
                            retry=FAST) as missing:
            with pytest.raises(NotFoundError):
                await missing.read(0, 10)

    run(main)


def test_s3_object_changed(s3: dict[str, str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint_url"], region_name="us-east-1")

    async def main() -> None:
        async with S3Source(s3["bucket"], "changing", endpoint_url=s3["endpoint_url"],
                            retry=FAST) as src:
            assert await src.read(0, 10) == DATA[:10]
            await trio.to_thread.run_sync(
                lambda: client.put_object(Bucket=s3["bucket"], Key="changing", Body=DATA[::-1]))
            with pytest.raises(ObjectChangedError, match="PreconditionFailed"):
                await src.read(0, 10)

    client.put_object(Bucket=s3["bucket"], Key="changing", Body=DATA)
    try:
        run(main)
    finally:
        client.close()


def test_run_server_until_ctrl_c(image: str) -> None:
    """The CLI entry point prints the URL, serves, and exits cleanly on SIGINT."""
    import signal
    import subprocess
    import sys
    import urllib.parse

    code = ("import sys; from incfs.serve import run_server; "
            "run_server(sys.argv[1], 0, '127.0.0.1')")
    # (a shell's background job ignores SIGINT, and its children with it)
    with subprocess.Popen([sys.executable, "-c", code, image], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
                          ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            url = urllib.parse.urlsplit(proc.stdout.readline().strip())
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            conn.request("GET", url.path, headers={"Range": "bytes=0-9"})
            assert conn.getresponse().read() == DATA[:10]
            conn.close()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            assert proc.stderr.read() == ""  # quiet by default
        finally:
            if proc.poll() is None:
                proc.kill()
