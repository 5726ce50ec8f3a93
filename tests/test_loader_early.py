"""A new cache's metadata read without the HTTP client (incfs.loader.early).

The answer to the request `cachefile.ask_early` sent is read with h11 on
the early connection; only a plain 206 of exactly the range asked is used,
and anything else is asked again through the HTTP client (real nginx behind
it). Answers are written by the tests on the other end of a socket pair: a
server that misbehaves in each way named, byte for byte."""

from __future__ import annotations

import json
import os
import random
import select
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from incfs.format.layout import SUPERBLOCK_SIZE, Superblock
from incfs.loader.cache import fetch_metadata
from incfs.loader.ondemand import SourceOnDemand
from incfs import preconnect
from incfs.loader.early import EarlyReader, EarlyRefused
from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.sources import ObjectChangedError, SourceIdentity
from incfs.testing.nginx import Nginx

from test_loader_util import MiB, make_tree

FIRST_READ = 64 * 1024


@pytest.fixture
def served(tmp_path):
    """nginx serving a packed image: (url, the image's bytes, its ETag)."""
    root = tmp_path / "www"
    root.mkdir()
    rng = random.Random(3)
    files = {f"d{i // 50}/f{i}": rng.randbytes(rng.randrange(1, 5000)) for i in range(120)}
    files["big"] = rng.randbytes(MiB)
    pack(make_tree(tmp_path / "src", files), root / "app.img", compress="zstd")
    with Nginx(root) as nginx:
        url = nginx.url("app.img")
        yield url, (root / "app.img").read_bytes(), _etag_of(url)


def _etag_of(url: str) -> str:
    import httpx

    return httpx.head(url).headers["etag"]


def _answer(body: bytes, status: str = "206 Partial Content", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _plain(image: bytes, etag: str, length: int = FIRST_READ) -> bytes:
    """The answer nginx gives: a 206 of the first `length` bytes."""
    return _answer(image[:length], Content_Range=f"bytes 0-{length - 1}/{len(image)}",
                   Content_Length=str(length), ETag=etag)


def _fetch(url: str, answer: bytes, length: int = FIRST_READ, *, close: bool = True,
           timeout: float = 5.0):
    """fetch_metadata with the early answer `answer`; returns (superblock,
    metadata, whether the HTTP client's source was opened, the identity)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = threading.Thread(target=_send, args=(theirs, answer, close), daemon=True)
    server.start()
    config = MountConfig(source=url, mountpoint="/unused")
    early = EarlyReader(url, length, ours, timeout)

    async def run():
        demand = SourceOnDemand(config, early)
        try:
            with trio.fail_after(30):
                sb, meta = await fetch_metadata(demand, length, 4 * MiB, early)
            return sb, meta, demand.opened is not None, early.identity
        finally:
            await demand.aclose()

    try:
        return trio.run(run)
    finally:
        theirs.close()
        server.join(10)


def _send(sock: socket.socket, answer: bytes, close: bool) -> None:
    """The server's side: the answer (more than a socket buffer holds, for
    some), then the end of the connection, unless `close` is False."""
    try:
        sock.sendall(answer)
        if close:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the reader stopped and closed its end: as a server sees it


def _metadata(image: bytes) -> bytes:
    return image[:Superblock.decode(image[:SUPERBLOCK_SIZE]).meta_end]


def test_a_plain_answer_is_used_and_the_client_never_opened(served):
    url, image, etag = served
    sb, meta, opened, identity = _fetch(url, _plain(image, etag))
    assert meta == _metadata(image) and len(meta) < FIRST_READ
    assert not opened
    assert (identity.size, identity.etag) == (len(image), etag)


def test_a_chunked_answer_is_read_through_its_chunks(served):
    url, image, etag = served
    body = image[:FIRST_READ]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                      for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    answer = _answer(chunks, Content_Range=f"bytes 0-{FIRST_READ - 1}/{len(image)}",
                     Transfer_Encoding="chunked", ETag=etag)
    _, meta, opened, _ = _fetch(url, answer)
    assert meta == _metadata(image) and not opened


def _refusals(image: bytes, etag: str) -> dict[str, bytes]:
    whole = f"bytes 0-{FIRST_READ - 1}/{len(image)}"
    head = image[:FIRST_READ]
    return {
        "200 with the whole object": _answer(image, "200 OK", Content_Length=str(len(image))),
        "another range": _answer(head, Content_Range=f"bytes 1-{FIRST_READ}/{len(image)}",
                                 Content_Length=str(FIRST_READ)),
        "no total size": _answer(head, Content_Range=f"bytes 0-{FIRST_READ - 1}/*",
                                 Content_Length=str(FIRST_READ)),
        "no Content-Range": _answer(head, Content_Length=str(FIRST_READ)),
        "gzip": _answer(head, Content_Range=whole, Content_Length=str(FIRST_READ),
                        Content_Encoding="gzip"),
        "a body cut short": _answer(head[:1000], Content_Range=whole,
                                    Content_Length=str(FIRST_READ)),
        "a longer body": _answer(image[:FIRST_READ + 10], Content_Range=whole,
                                 Content_Length=str(FIRST_READ + 10)),
        "a 503": _answer(b"busy", "503 Service Unavailable", Content_Length="4"),
        "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
        "nothing": b"",
    }


@pytest.mark.parametrize("case", list(_refusals(b"", "")))
def test_any_other_answer_is_asked_again_through_the_client(served, case):
    """Each is refused before a byte of its body is used; the client asks
    nginx again and the metadata is the image's."""
    url, image, etag = served
    answer = _refusals(image, etag)[case]
    if case == "a body cut short":  # the superblock is in it: refused at the end, not before
        answer = answer[:answer.index(b"\r\n\r\n") + 4 + 1000]
    _, meta, opened, _ = _fetch(url, answer)
    assert meta == _metadata(image)
    assert opened


def test_a_stalled_answer_is_given_up_after_the_read_timeout(served):
    url, image, etag = served
    _, meta, opened, _ = _fetch(url, b"HTTP/1.1 206 Partial Content\r\n", close=False,
                                timeout=0.3)
    assert meta == _metadata(image) and opened


def test_metadata_past_the_first_read_comes_through_the_client(served):
    """With a first read shorter than the metadata and no early connection
    left, the early answer gives the head and the client (opened for it)
    the rest."""
    url, image, etag = served
    length = 4096
    assert len(_metadata(image)) > length
    _, meta, opened, identity = _fetch(url, _plain(image, etag, length), length)
    assert meta == _metadata(image) and opened and identity.etag == etag


def test_the_client_refuses_an_object_other_than_the_early_answers(served):
    """The client, opened for the rest, takes the early answer's ETag as
    first seen: nginx's (another) is "the object changed"."""
    url, image, _ = served
    with pytest.raises(ObjectChangedError, match="ETag changed"):
        _fetch(url, _plain(image, '"another-image"', 4096), 4096)


def _early_prelude(url: str, count: int) -> str:
    """The start of a script run in a process of its own: `count`
    connections to `url`'s host opened early (as mount_background opens
    them) and handed to it, the first one's handshake done."""
    return textwrap.dedent(f"""
        import json, os, select, sys
        import trio
        from incfs import preconnect
        from incfs.mount import MountConfig
        env, fds = preconnect.open_early({url!r}, {count})
        os.environ.update(env)
        poller = select.poll()
        poller.register(fds[0], select.POLLOUT)
        poller.poll(5000)
    """)


def test_open_cache_mounts_a_new_cache_without_importing_the_client(tmp_path, served):
    """Through the real path: connections opened early (as mount_background
    does), the request sent (as the daemon does first), open_cache. The
    cache is made, no source is returned (the loader opens it after READY),
    httpx is not loaded, and the identity is the object's. The metadata's
    connection is kept, with the rest of its answer, for the loader
    (incfs.loader.tail): the pool still counts both."""
    url, image, etag = served
    cache = tmp_path / "cache.img"
    proc = subprocess.run([sys.executable, "-c", _early_prelude(url, 2) + textwrap.dedent(f"""
        from incfs.loader import cachefile
        from incfs.loader.cache import open_cache
        config = MountConfig(source={url!r}, mountpoint="/unused", cache={str(cache)!r})
        cachefile.ask_early(config)
        image, source = trio.run(open_cache, config)
        identity = image.cache_info["identity"]
        rest = image.cache_info["first_rest"]
        print(json.dumps({{"httpx": "httpx" in sys.modules, "source": source is not None,
                          "rest": rest.rest_pending, "size": identity.size, "etag": identity.etag,
                          "files": len(image.ns.inodes), "left": preconnect.available(
                              "127.0.0.1", int({url!r}.split(":")[2].split("/")[0]))}}))
    """)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {"httpx": False, "source": False, "rest": True, "size": len(image),
                   "etag": etag, "files": got["files"], "left": 2}
    assert got["files"] > 120 and cache.stat().st_size >= len(_metadata(image))


def test_an_answer_of_another_object_than_the_first_is_refused(served):
    """A reader for the rest of the metadata sends its own request, and its
    answer must name the object the first answer did."""
    url, image, etag = served
    ours, theirs = socket.socketpair()
    answer = _answer(image[4096:8192], Content_Range=f"bytes 4096-8191/{len(image)}",
                     Content_Length="4096", ETag='"another-image"')
    server = threading.Thread(target=_send, args=(theirs, answer, True), daemon=True)
    server.start()
    reader = EarlyReader(url, 4096, ours, 5.0, offset=4096, send=True,
                         expect=SourceIdentity(len(image), etag))
    with pytest.raises(EarlyRefused, match="another object"):
        trio.run(reader.read_prefix, lambda body: None)
    server.join(10)
    assert theirs.recv(4096) == preconnect.range_request(url, 4096, 4096)
    theirs.close()


@pytest.mark.parametrize("ranges", [2, 5])
def test_the_rest_of_the_metadata_comes_over_idle_early_connections(served, ranges):
    """Three connections opened early: the first carries the first read;
    the rest of the metadata, in `ranges` pieces asked for at once, goes one
    piece to each of the two others (and the first, if its answer is read
    by then: it goes back to the pool), and only pieces beyond those three
    need the client."""
    url, image, _ = served
    first, meta_end = 4096, len(_metadata(image))
    chunk = -(-(meta_end - first) // ranges)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, os, select, sys
        import trio
        from incfs import preconnect
        from incfs.mount import MountConfig
        from incfs.loader.cache import fetch_metadata
        from incfs.loader.ondemand import SourceOnDemand
        from incfs.loader.early import EarlyReader
        env, fds = preconnect.open_early({url!r}, 3)
        os.environ.update(env)
        for fd in fds:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(5000)
        assert preconnect.ask_early({url!r}, {first})
        config = MountConfig(source={url!r}, mountpoint="/unused")
        early = EarlyReader.take(config, {first})

        async def main():
            demand = SourceOnDemand(config, early)
            sb, meta = await fetch_metadata(demand, {first}, {chunk}, early)
            opened = demand.opened is not None
            await demand.aclose()
            return meta, opened

        meta, opened = trio.run(main)
        sys.stdout.buffer.write(json.dumps({{"httpx": "httpx" in sys.modules,
                                            "opened": opened}}).encode() + b"\\n" + meta)
    """)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    line, meta = proc.stdout.split(b"\n", 1)
    assert meta == _metadata(image)
    assert json.loads(line) == ({"httpx": False, "opened": False} if ranges == 2 else
                                {"httpx": True, "opened": True})


# --- the first data reads (incfs.loader.ondemand) -------------------------------------

def _read_on_early_connection(image: bytes, answer: bytes) -> tuple[bytes, int, bool]:
    """A reader of bytes 4096-8191 on a connection opened early (as a
    mount's daemon has them) to a server that answers `answer` and keeps
    the connection open. Returns the body, the connections the early pool
    holds afterwards, and whether the next reader gets one."""
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/app.img"

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
            conn.recv(1)  # open until the reader's side ends

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    env, fds = preconnect.open_early(url, 1)
    os.environ.update(env)
    try:
        preconnect.adopt()
        poller = select.poll()
        poller.register(fds[0], select.POLLOUT)
        poller.poll(5000)
        config = MountConfig(source=url, mountpoint="/unused")
        expect = SourceIdentity(len(image), '"x"', None)
        reader = EarlyReader.idle(config, 4096, 4096, expect)
        assert reader is not None
        body = trio.run(reader.read_prefix, lambda body: None)
        left = preconnect.available("127.0.0.1", listener.getsockname()[1])
        again = preconnect.take_idle(url)
        if again is not None:
            again.close()
        return body, left, again is not None
    finally:
        os.environ.pop(preconnect.ENV, None)
        preconnect.discard()
        listener.close()
        server.join(10)


def test_a_connection_whose_answer_was_read_whole_goes_back_to_the_pool(served):
    _, image, _ = served
    answer = _answer(image[4096:8192], Content_Range=f"bytes 4096-8191/{len(image)}",
                     Content_Length="4096", ETag='"x"')
    body, left, again = _read_on_early_connection(image, answer)
    assert body == image[4096:8192]
    assert left == 1 and again  # idle again, for the next early reader or the client


@pytest.mark.parametrize("closing", ["Connection: close", "HTTP/1.0"])
def test_a_connection_the_server_closes_is_not_given_back(served, closing):
    _, image, _ = served
    answer = _answer(image[4096:8192], Content_Range=f"bytes 4096-8191/{len(image)}",
                     Content_Length="4096", ETag='"x"',
                     **({"Connection": "close"} if closing.startswith("Connection") else {}))
    if closing == "HTTP/1.0":
        answer = answer.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    body, left, again = _read_on_early_connection(image, answer)
    assert body == image[4096:8192] and left == 0 and not again


def _first_reads(url: str, script: str) -> dict:
    """Run `script` (an async `main(demand, image_size)` returning a dict)
    in a process of its own with one connection to nginx opened early, as a
    mount's daemon has them, and a SourceOnDemand holding the object's
    identity as the metadata's early answer gave it."""
    import httpx

    head = httpx.head(url).headers
    proc = subprocess.run([sys.executable, "-c", _early_prelude(url, 1) + textwrap.dedent(f"""
        from incfs.loader.ondemand import SourceOnDemand
        from incfs.sources import SourceIdentity
        preconnect.adopt()
        config = MountConfig(source={url!r}, mountpoint="/unused")
        size = {int(head["content-length"])}
        identity = SourceIdentity(size, {head["etag"]!r}, {head["last-modified"]!r})
    """) + textwrap.dedent(script) + textwrap.dedent("""
        async def run():
            demand = SourceOnDemand(config, identity=identity)
            try:
                got = await main(demand, size)
            finally:
                await demand.aclose()
            got["httpx"] = "httpx" in sys.modules
            got["opened"] = demand.opened is not None
            got["early_requests"] = demand.stats.early_requests
            return got

        print(json.dumps(trio.run(run)))
    """)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_first_reads_go_one_after_another_over_one_early_connection(served):
    """Each answer read whole puts the connection back: three reads, one
    connection, no HTTP client."""
    url, image, _ = served
    got = _first_reads(url, """
        import hashlib
        async def main(demand, size):
            pieces = [await demand.read(offset, 70000) for offset in (0, 300000, size - 70000)]
            streamed = []
            last = await demand.read_streaming(500000, 200000, lambda body: streamed.append(len(body)))
            return {"sha": [hashlib.sha256(p).hexdigest() for p in pieces + [last]],
                    "streamed": streamed[-1] if streamed else 0}
    """)
    import hashlib

    want = [image[0:70000], image[300000:370000], image[-70000:], image[500000:700000]]
    assert got["sha"] == [hashlib.sha256(p).hexdigest() for p in want]
    assert got["streamed"] == 200000
    assert got == {**got, "httpx": False, "opened": False, "early_requests": 4}


def test_a_read_with_no_early_connection_left_opens_the_client(served):
    """Two reads at once and one connection: one goes early, the other
    through the client, which the source opens for it; both are right."""
    url, image, _ = served
    got = _first_reads(url, """
        import hashlib
        async def main(demand, size):
            got = {}
            async def one(offset):
                got[offset] = hashlib.sha256(await demand.read(offset, 100000)).hexdigest()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)
                nursery.start_soon(one, 400000)
            return {"sha": [got[0], got[400000]], "requests": demand.stats.requests}
    """)
    import hashlib

    assert got["sha"] == [hashlib.sha256(image[o:o + 100000]).hexdigest() for o in (0, 400000)]
    assert got["httpx"] and got["opened"]
    assert got["early_requests"] == 1 and got["requests"] == 2  # the opened source counts both


def test_a_first_read_of_another_object_is_told_as_a_change(served):
    """The object was replaced since the metadata's answer: the early answer
    is refused (another ETag), the client asks again, and its answer is
    "the object changed", not bytes of another image."""
    url, image, _ = served
    got = _first_reads(url, """
        from incfs.sources import ObjectChangedError
        identity = SourceIdentity(size, '"the-image-before"', None)
        async def main(demand, size):
            try:
                await demand.read(0, 4096)
            except ObjectChangedError as e:
                return {"error": str(e)}
            return {"error": None}
    """)
    assert "ETag changed" in (got["error"] or "")
    assert got["opened"] and got["early_requests"] == 0
