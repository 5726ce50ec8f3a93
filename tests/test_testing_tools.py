"""Tests for the network/server emulation tools in ``incfs.testing``.

They use the real things (nginx, network namespaces, tc) because the point of
the tools is to behave like a real server and link.  Timing checks are lower
bounds, except one generous upper bound proving that proxy delay is a latency
queue rather than a per-chunk sleep.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from incfs.testing.faultproxy import FaultProxy
from incfs.testing.link import shaped_http_server
from incfs.testing.netns import NS_PREFIX, EmulatedLink, cleanup_stale, missing_feature
from incfs.testing.nginx import Nginx

pytestmark = pytest.mark.timeout(60)

BIG = 4 * 1024 * 1024
SMALL = 64 * 1024


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    (root / "big.img").write_bytes(os.urandom(BIG))
    (root / "small.bin").write_bytes(os.urandom(SMALL))
    return root


@pytest.fixture(scope="module")
def big(data_dir: Path) -> bytes:
    return (data_dir / "big.img").read_bytes()


@pytest.fixture(scope="module")
def nginx(data_dir: Path) -> Iterator[Nginx]:
    with Nginx(data_dir) as server:
        yield server


@pytest.fixture
def proxy(nginx: Nginx) -> Iterator[FaultProxy]:
    with FaultProxy(nginx.address) as p:
        yield p


@pytest.fixture(scope="module")
def netns_ok() -> None:
    """Skip namespace tests (only those) when the kernel cannot do them."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    reason = missing_feature()
    if reason is not None:
        pytest.skip(f"missing kernel feature: {reason}")


def raw_get(port: int, path: str, timeout: float = 5.0) -> tuple[bytes, BaseException | None]:
    """HTTP/1.0 GET on a bare socket: every byte received, and how it ended."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET /{path} HTTP/1.0\r\nHost: t\r\n\r\n".encode())
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            return bytes(received), exc
    return bytes(received), None


def our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{NS_PREFIX}{os.getpid()}-")]


def links_named(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


# ------------------------------------------------------------------- nginx
def test_nginx_range_request_returns_206(nginx: Nginx, big: bytes) -> None:
    nginx.clear_requests()
    r = httpx.get(nginx.url("big.img"), headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 1000-1999/{BIG}"
    assert r.content == big[1000:2000]
    [entry] = nginx.requests()
    assert (entry.method, entry.path, entry.status) == ("GET", "/big.img", 206)
    assert (entry.range, entry.body_bytes) == ("bytes=1000-1999", 1000)


def test_nginx_is_read_only_and_rejects_bad_ranges(nginx: Nginx) -> None:
    assert httpx.put(nginx.url("big.img"), content=b"x").status_code in (403, 405)
    r = httpx.get(nginx.url("big.img"), headers={"Range": f"bytes={BIG}-"})
    assert r.status_code == 416
    assert nginx.requests()[-1].status == 416


# ------------------------------------------------------------------- proxy
def test_proxy_forwards_and_counts(proxy: FaultProxy, data_dir: Path) -> None:
    r = httpx.get(proxy.url("small.bin"))
    assert r.content == (data_dir / "small.bin").read_bytes()
    assert proxy.connections == 1
    # the proxy counts a piece once its send returns, which may be after the
    # client has read it: the last piece can be counted a moment later
    deadline = time.monotonic() + 5
    while proxy.bytes_down <= SMALL and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.bytes_down > SMALL
    assert proxy.bytes_up > 0


def test_proxy_delay_raises_round_trip_time(proxy: FaultProxy) -> None:
    with httpx.Client() as client:
        client.get(proxy.url("small.bin"))  # connection set up without delay
        proxy.delay_up, proxy.delay_down = 0.03, 0.05
        for _ in range(3):
            start = time.monotonic()
            client.get(proxy.url("small.bin"), headers={"Range": "bytes=0-0"})
            assert time.monotonic() - start >= 0.08 - 0.002


def test_proxy_delay_is_a_latency_queue_not_a_throughput_limit(proxy: FaultProxy, big: bytes) -> None:
    proxy.set_rtt(0.1)
    start = time.monotonic()
    r = httpx.get(proxy.url("big.img"))
    elapsed = time.monotonic() - start
    assert r.content == big
    assert elapsed >= 0.1
    # A sleep-per-64KiB-chunk proxy would need >= 64 * 0.05 s = 3.2 s.
    assert elapsed < 2.0


def test_proxy_bandwidth_cap(proxy: FaultProxy) -> None:
    proxy.rate_down = 4_000_000
    start = time.monotonic()
    r = httpx.get(proxy.url("big.img"), headers={"Range": f"bytes=0-{2 * 1024 * 1024 - 1}"})
    assert len(r.content) == 2 * 1024 * 1024
    assert time.monotonic() - start >= 0.45  # 2 MiB / 4 MB/s = 0.52 s, minus burst


def test_proxy_reset_after(proxy: FaultProxy, big: bytes) -> None:
    proxy.reset_after(100_000, count=1)
    data, err = raw_get(proxy.port, "big.img")
    assert isinstance(err, ConnectionResetError)
    assert len(data) == 100_000  # exactly the promised bytes, then RST
    assert big.startswith(data.split(b"\r\n\r\n", 1)[1])
    assert proxy.resets == 1
    assert httpx.get(proxy.url("big.img")).content == big  # count=1: disarmed


def test_proxy_reset_seen_by_httpx(proxy: FaultProxy) -> None:
    proxy.reset_after(50_000)
    with pytest.raises(httpx.ReadError):
        httpx.get(proxy.url("big.img"))


def test_proxy_truncate_after(proxy: FaultProxy) -> None:
    proxy.truncate_after(123_457)
    data, err = raw_get(proxy.port, "big.img")
    assert err is None and len(data) == 123_457  # clean EOF, short body
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(proxy.url("big.img"))
    assert proxy.truncations == 2


def test_proxy_corrupt_at(proxy: FaultProxy, big: bytes) -> None:
    proxy.corrupt_at(1_000_000, count=1)
    got = httpx.get(proxy.url("big.img")).content
    diffs = [i for i in range(len(big)) if got[i] != big[i]]
    assert len(diffs) == 1 and got[diffs[0]] == big[diffs[0]] ^ 0xFF
    assert httpx.get(proxy.url("big.img")).content == big


def test_proxy_stall_keeps_connection_open(proxy: FaultProxy, data_dir: Path) -> None:
    proxy.stall()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.3) as sock:
        sock.sendall(b"GET /small.bin HTTP/1.0\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1)
        proxy.unstall()
        sock.settimeout(5)
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    assert data.endswith((data_dir / "small.bin").read_bytes())


def test_proxy_stall_times_out_httpx(proxy: FaultProxy) -> None:
    proxy.stall()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(proxy.url("small.bin"), timeout=0.3)
    proxy.unstall()
    assert httpx.get(proxy.url("small.bin")).status_code == 200


def test_proxy_refuse(proxy: FaultProxy) -> None:
    proxy.refuse = True
    with pytest.raises(httpx.TransportError):
        httpx.get(proxy.url("small.bin"))
    assert proxy.refused == 1
    proxy.refuse = False
    assert httpx.get(proxy.url("small.bin")).status_code == 200


def test_proxy_close_stops_everything(nginx: Nginx) -> None:
    p = FaultProxy(nginx.address).start()
    port = p.port
    sock = socket.create_connection(("127.0.0.1", port))  # left open on purpose
    p.close()
    sock.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ------------------------------------------------------------ namespaces
@pytest.mark.usefixtures("netns_ok")
def test_tbf_link_caps_throughput(data_dir: Path, big: bytes) -> None:
    with EmulatedLink(rate_bit=8_000_000) as link, Nginx(data_dir, host=link.ns_addr, netns=link.ns_name) as n:
        start = time.monotonic()
        r = httpx.get(n.url("big.img"), timeout=30)
        elapsed = time.monotonic() - start
    assert r.content == big
    assert elapsed >= 3.0  # 4 MiB at 8 Mbit/s is 4.2 s


@pytest.mark.usefixtures("netns_ok")
def test_shaped_http_server(data_dir: Path, big: bytes) -> None:
    with shaped_http_server(data_dir, rtt_s=0.1, rate_bit=200_000_000) as srv:
        assert srv.base_url == srv.proxy.url()
        with httpx.Client() as client:
            start = time.monotonic()
            r = client.get(srv.url("big.img"), headers={"Range": "bytes=5-9"})
            assert time.monotonic() - start >= 0.2  # handshake RTT + request RTT
            assert (r.status_code, r.content) == (206, big[5:10])
        assert srv.nginx.requests()[-1].range == "bytes=5-9"
        ns_name = srv.link.ns_name
    assert ns_name not in our_namespaces()


@pytest.mark.usefixtures("netns_ok")
def test_link_cleanup_on_error_kills_processes() -> None:
    with pytest.raises(RuntimeError, match="boom"), EmulatedLink(rate_bit=None) as link:
        proc = link.run_in_ns(["sleep", "60"])
        names = (link.ns_name, link.host_if)
        raise RuntimeError("boom")
    assert proc.wait(timeout=5) is not None
    assert names[0] not in our_namespaces()
    assert not links_named(names[1])


@pytest.mark.usefixtures("netns_ok")
def test_cleanup_stale_removes_only_dead_owners() -> None:
    stale = f"{NS_PREFIX}99999999-0"  # beyond any pid_max: owner is dead
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with EmulatedLink(rate_bit=None) as live:
            removed = cleanup_stale()
            assert stale in removed
            assert live.ns_name not in removed and live.ns_name in our_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
    assert our_namespaces() == []
