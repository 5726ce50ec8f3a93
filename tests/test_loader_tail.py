"""The blocks that came with a new cache's metadata (incfs.loader.tail).

A new cache's first answer holds the image's first 64 KiB; past a small
image's metadata they are the first hash trees. The loader stores those
(checked as any fetched block) instead of asking for them again, and what
fails its check is fetched when wanted. Real mounts against real nginx (and
the fault proxy in front of it, which flips a byte of that answer)."""

from __future__ import annotations

import random
import socket

import pytest

from incfs.format.layout import SUPERBLOCK_SIZE, Superblock
from incfs.loader.early import EarlyReader
from incfs.pack import pack
from incfs.testing.faultproxy import FaultProxy
from incfs.testing.nginx import Nginx

from test_loader import _assert_same, _config
from test_loader_util import MiB, make_tree, mounted, status, wait_for

FIRST_READ = 64 * 1024


def _tree(tmp_path):
    """24 files of 2-30 blocks (one hash block each) and one of 1 MiB."""
    rng = random.Random(7)
    files = {f"d/f{i:02d}": rng.randbytes(rng.randrange(5000, 120000)) for i in range(24)}
    files["big"] = rng.randbytes(MiB)
    return make_tree(tmp_path / "src", files)


@pytest.fixture
def served(tmp_path, keys):
    """nginx serving a signed image of _tree: (nginx, source tree, public key, metadata end)."""
    root = tmp_path / "www"
    root.mkdir()
    src = _tree(tmp_path)
    private, public = keys("ed25519")
    pack(src, root / "app.img", compress="zstd", sign_key=private)
    head = (root / "app.img").read_bytes()[:SUPERBLOCK_SIZE]
    meta_end = Superblock.decode(head).meta_end
    assert meta_end < FIRST_READ - 8192  # room for hash blocks in the first answer
    with Nginx(root) as nginx:
        yield nginx, src, public, meta_end


def _gets(nginx) -> list[tuple[int, int]]:
    """(first, last) byte of each GET nginx answered, in order."""
    got = []
    for entry in nginx.requests():
        if entry.method == "GET":
            assert entry.status == 206 and entry.range, entry
            first, last = entry.range.split("=", 1)[1].split("-")
            got.append((int(first), int(last)))
    return got


def test_the_first_answers_hash_blocks_are_stored_and_never_asked_again(tmp_path, served):
    nginx, src, public, _ = served
    config = _config(tmp_path, nginx.url("app.img"), allow_unsigned=False, key=str(public),
                     prefetch="none")
    with mounted(config) as mnt:
        # no read yet: what is present came in the metadata's answer
        wait_for(lambda: status(mnt)["blocks_present"] > 0, 30, what="the first answer's blocks")
        assert _gets(nginx) == [(0, FIRST_READ - 1)]
        s = status(mnt)
        assert s["verify_failures"] == 0 and s["signed"]
        _assert_same(mnt, src)
        s = status(mnt)
        assert s["reads_failed"] == 0 and s["verify_failures"] == 0
    gets = sorted(_gets(nginx))
    # every byte was asked for once: no range overlaps another (a hash
    # block of the first answer fetched again would)
    assert all(a[1] < b[0] for a, b in zip(gets, gets[1:])), gets


def _header_length(url: str) -> int:
    """Bytes of nginx's headers before the body of the first answer."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Range: bytes=0-{FIRST_READ - 1}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    return answer.index(b"\r\n\r\n") + 4


def test_a_damaged_block_of_the_first_answer_is_refused_and_fetched(tmp_path, served):
    """A byte flipped on the wire in the last block of the first answer (a
    hash block of the first trees): that block fails its check against the
    signed root and is not stored; its file reads right, the block fetched
    again."""
    nginx, src, public, _ = served
    host, port = nginx.url("app.img").split("//", 1)[1].split("/", 1)[0].split(":")
    # nginx's headers differ between two answers only in the Date's value
    offset = _header_length(nginx.url("app.img")) + FIRST_READ - 100
    with FaultProxy((host, int(port))) as proxy:
        proxy.corrupt_at(offset, count=1)
        config = _config(tmp_path, proxy.url("/app.img"), allow_unsigned=False,
                         key=str(public), prefetch="none")
        with mounted(config) as mnt:
            wait_for(lambda: status(mnt)["verify_failures"] > 0, 30, what="the refusal")
            assert proxy.corruptions == 1
            _assert_same(mnt, src)
            s = status(mnt)
            assert s["reads_failed"] == 0
    gets = _gets(nginx)
    assert gets[0] == (0, FIRST_READ - 1)
    assert any(first < FIRST_READ for first, _ in gets[1:])  # the refused block, asked again


def test_a_first_answer_cut_after_the_metadata_loses_nothing(tmp_path, served):
    """The connection closed after the metadata: the rest is dropped (the
    reader says so), the mount is up and every file reads right."""
    nginx, src, public, meta_end = served
    host, port = nginx.url("app.img").split("//", 1)[1].split("/", 1)[0].split(":")
    with FaultProxy((host, int(port))) as proxy:
        proxy.truncate_after(_header_length(nginx.url("app.img")) + meta_end + 10, count=1)
        config = _config(tmp_path, proxy.url("/app.img"), allow_unsigned=False,
                         key=str(public), prefetch="none")
        with mounted(config) as mnt:
            _assert_same(mnt, src)
            s = status(mnt)
            assert s["reads_failed"] == 0 and s["verify_failures"] == 0
            assert proxy.truncations == 1


def test_read_rest_gives_the_whole_answer_and_the_connection_back(tmp_path):
    """At the reader: read_prefix(keep_rest=True) stops at what `needed`
    asks, read_rest reads on to the end and gives the whole body."""
    import threading

    import trio

    body = random.Random(1).randbytes(FIRST_READ)
    answer = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{FIRST_READ - 1}/999999"
              f"\r\nContent-Length: {FIRST_READ}\r\n\r\n").encode() + body
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = threading.Thread(target=lambda: theirs.sendall(answer), daemon=True)
    server.start()
    reader = EarlyReader("http://127.0.0.1:9/app.img", FIRST_READ, ours, 10)

    async def run():
        prefix = await reader.read_prefix(lambda head: 1000, keep_rest=True)
        pending = reader.rest_pending
        return prefix, pending, await reader.read_rest(), reader.rest_pending

    prefix, pending, whole, after = trio.run(run)
    server.join(10)
    theirs.close()
    assert len(prefix) >= 1000 and body.startswith(prefix)
    assert pending and not after
    assert whole == body
