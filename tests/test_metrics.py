"""Prometheus metrics of a real mount: `incfs metrics MOUNTPOINT` and the
daemon's HTTP /metrics, parsed with prometheus_client's own parser; and
scrapers that send garbage or hold the connection open cannot hurt the mount."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.metrics_http import MAX_CONNECTIONS, parse_listen
from mounting import fork_child, mounts, wait_child, wait_until  # noqa: F401 - fixture

INCFS = [sys.executable, "-m", "incfs.cli"]
BLOCKS = 16
SCRAPES = 300  # at the server's 100 connections a second (metrics_http.MAX_RATE)
CONTENT = bytes(range(256)) * (BLOCKS * BLOCK_SIZE // 256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _read_block(path: str, index: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE) == \
            CONTENT[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
    finally:
        os.close(fd)


def _block(i: int) -> tuple[int, bytes]:
    return i, CONTENT[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]


def with_a_miss(m) -> None:
    """A file of BLOCKS blocks, half present, and one read that had to wait
    for its block (so the miss-latency histogram has an observation)."""
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=len(CONTENT))
        c.fill_blocks(ino, [_block(i) for i in range(BLOCKS // 2)])
        reader = fork_child(_read_block, os.fspath(m / "f.bin"), BLOCKS - 1)
        wait_until(lambda: m.status()["pending_reads"] > 0, timeout=60, what="a pending read")
        c.fill_blocks(ino, [_block(BLOCKS - 1)])
        assert wait_child(reader) == 0
    _read_block(os.fspath(m / "f.bin"), 0)  # a read that is all present


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def check_metrics(text: str, status: dict) -> None:
    got = samples(text)
    kinds = families(text)
    assert kinds["incfs_bytes_read"] == "counter"
    assert kinds["incfs_miss_latency_seconds"] == "histogram"
    assert kinds["incfs_blocks_present"] == "gauge"
    for key, name in [("bytes_filled", "incfs_bytes_filled_total"),
                      ("bytes_fetched", "incfs_bytes_fetched_total"),
                      ("blocks_total", "incfs_blocks"), ("files", "incfs_files"),
                      ("timeouts", "incfs_read_timeouts_total"),
                      ("verify_failures", "incfs_verify_failures_total"),
                      ("read_errors", "incfs_read_errors_total")]:
        assert got[name, ()] == status[key], name
    assert got["incfs_blocks_present", ()] == BLOCKS // 2 + 1
    assert got["incfs_misses_total", ()] >= 1
    assert got["incfs_bytes_read_total", ()] >= 2 * BLOCK_SIZE
    assert got["incfs_complete", ()] == 0
    assert got["incfs_pending_reads", ()] >= 0  # kernel readahead may wait for blocks
    assert got["incfs_uptime_seconds", ()] > 0
    # the histogram: cumulative buckets ending in +Inf == count, at least one miss
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in got.items()
                     if name == "incfs_miss_latency_seconds_bucket")
    assert buckets[-1][0] == float("inf")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == got["incfs_miss_latency_seconds_count", ()] >= 1
    assert got["incfs_miss_latency_seconds_sum", ()] > 0
    assert any(name == "incfs_info" for name, _ in got)


def test_incfs_metrics_command(mounts):
    m = mounts()
    with_a_miss(m)
    proc = subprocess.run(INCFS + ["metrics", os.fspath(m)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_metrics(proc.stdout, m.status())


def test_incfs_metrics_not_a_mount(tmp_path):
    proc = subprocess.run(INCFS + ["metrics", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "not an incfs mount" in proc.stderr


def test_http_metrics_and_404(mounts):
    port = _free_port()
    m = mounts(metrics_listen=f"127.0.0.1:{port}")
    with_a_miss(m)
    code, ctype, text = scrape(port)
    assert code == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    check_metrics(text, m.status())
    for path in ("/", "/metricsX", "/../metrics"):
        assert scrape(port, path)[0] == 404


def _raw(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_http_garbage_and_held_connections(mounts):
    port = _free_port()
    m = mounts(metrics_listen=f"127.0.0.1:{port}")
    with_a_miss(m)
    for garbage in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET\r\n\r\n",
                    b"GET /metrics SMTP/9\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n"):
        answer = _raw(port, garbage)
        assert answer.split(b" ", 2)[1] in (b"400", b"405"), (garbage[:40], answer[:80])
    # clients that connect and send nothing, or half a request, and hold on:
    # more of them than the server serves at once
    held = []
    try:
        for i in range(MAX_CONNECTIONS + 4):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            if i % 2:
                s.sendall(b"GET /metr")
            held.append(s)
        # the mount does not notice: reads, status and the control socket answer
        _read_block(os.fspath(m / "f.bin"), 1)
        assert m.status()["blocks_present"] == BLOCKS // 2 + 1
        with m.client() as c:
            assert c.status()["files"] == 1
        # and the held connections are closed by the server (its deadline),
        # each after an answer of 400/503 or nothing, never left open
        for s in held:
            rest = b""
            while chunk := s.recv(65536):
                rest += chunk
            assert rest == b"" or rest.split(b" ", 2)[1] in (b"400", b"503")
    finally:
        for s in held:
            s.close()
    code, _, text = scrape(port)
    assert code == 200
    check_metrics(text, m.status())


def test_lazy_reads_go_on_while_scrapers_misbehave(mounts):
    """Garbage and held /metrics connections, more than the server serves
    at once, while a read waits for a block a loader then fills: the read
    gets its bytes and a scrape afterwards sees them."""
    port = _free_port()
    m = mounts(metrics_listen=f"127.0.0.1:{port}")
    with_a_miss(m)
    held = []
    try:
        for i in range(MAX_CONNECTIONS + 4):
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(b"\xff\x00garbage" if i % 2 else b"GET /metr")
            held.append(s)
        with m.client() as c:
            reader = fork_child(_read_block, os.fspath(m / "f.bin"), BLOCKS - 2)
            wait_until(lambda: any(r.block == BLOCKS - 2 for r in c.pending_reads()),
                       timeout=60, what="the lazy read to wait")
            ino = c.lookup(ROOT_INO, "f.bin")
            c.fill_blocks(ino, [_block(BLOCKS - 2)])
            assert wait_child(reader) == 0
    finally:
        for s in held:
            s.close()
    wait_until(lambda: scrape(port)[0] == 200, timeout=60, what="a scrape to be served")
    got = samples(scrape(port)[2])
    assert got["incfs_blocks_present", ()] in (BLOCKS // 2 + 1, BLOCKS // 2 + 2)  # 1 s render
    wait_until(lambda: samples(scrape(port)[2])["incfs_blocks_present", ()] == BLOCKS // 2 + 2,
               timeout=60, what="the next rendering")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_many_scrapes_leave_nothing_behind(mounts):
    """Scrape after scrape: every connection is closed, no descriptor stays
    open in the daemon, and the mount reads as before."""
    port = _free_port()
    m = mounts(metrics_listen=f"127.0.0.1:{port}")
    with_a_miss(m)
    assert scrape(port)[0] == 200
    wait_until(lambda: _open_fds(m.pid) is not None, what="the daemon")
    before = _open_fds(m.pid)
    for _ in range(SCRAPES):
        assert scrape(port)[0] == 200
    # a connection's socket goes once the client has read its answer and closed
    wait_until(lambda: _open_fds(m.pid) <= before, timeout=60, what="sockets to close")
    _read_block(os.fspath(m / "f.bin"), 2)
    assert samples(scrape(port)[2])["incfs_blocks_present", ()] == BLOCKS // 2 + 1


def test_listen_address_checked_at_mount(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        (tmp_path / "mnt").mkdir()
        proc = subprocess.run(INCFS + ["mount", "empty", str(tmp_path / "mnt"),
                                       "--cache", str(tmp_path / "c.img"),
                                       "--metrics-listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--metrics-listen" in proc.stderr and "in use" in proc.stderr
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
    ("9100", ("127.0.0.1", 9100)), ("[::1]:9100", ("::1", 9100)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_listen(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1:", "host:port", "1.2.3.4:70000", ""])
def test_parse_listen_rejects(value):
    with pytest.raises(ValueError):
        parse_listen(value)


def test_serve_metrics_standalone(tmp_path):
    """serve_metrics on its own (outside a mount): it reports the port it
    bound and answers from a real Service over a real image."""
    import trio

    from incfs.image import Image
    from incfs.metrics_http import serve_metrics
    from incfs.service import Service

    image = Image.create(tmp_path / "x.img")

    async def main() -> str:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_metrics, Service(image, None), "127.0.0.1", 0)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            nursery.cancel_scope.cancel()
        return answer.decode()

    try:
        answer = trio.run(main)
    finally:
        image.close()
    head, body = answer.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 200")
    got = samples(body)
    assert got["incfs_files", ()] == 0 and got["incfs_complete", ()] == 1
    assert got["incfs_miss_latency_seconds_count", ()] == 0
