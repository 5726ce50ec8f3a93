"""Abuse of the loader protocol on a real mount: malformed, truncated,
oversized, wrong-version and out-of-order frames, bad fills, clients that
vanish mid-message, too many connections, and kill -9 of the daemon.

Whatever a client sends, it gets an error answer or its connection is
closed; the mount stays up, a new client works, and nothing already stored
changes."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mounting import (SeedFile, errno_of, expected_blocks, is_mounted, make_blocks, mounts,
                      validate_file, wait_gone)

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import wire
from incfs.control.client import FillError
from incfs.control.server import MAX_CONNECTIONS
from incfs.control.wire import Op

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

HEADER = wire.HEADER  # <IHHI: payload length, version, operation, request id


def payload(fields, tail: bytes = b"") -> bytes:
    body = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
    return struct.pack("<I", len(body)) + body + tail


def frame(op: int, request_id: int, fields, tail: bytes = b"", version: int = wire.VERSION,
          length: int | None = None) -> bytes:
    body = payload(fields, tail)
    return HEADER.pack(len(body) if length is None else length, version, op, request_id) + body


class Raw:
    """A bare connection to the control socket."""

    def __init__(self, mount):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect((mount.path / ".incfs" / "control").read_text().strip())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, int, dict, bytes] | None:
        """(op, request id, fields, tail), or None once the server closed."""
        header = self._exact(HEADER.size)
        if header is None:
            return None
        length, version, op, request_id = HEADER.unpack(header)
        assert version == wire.VERSION
        body = self._exact(length)
        fields, tail = wire.decode_payload(body)
        return op, request_id, fields, bytes(tail)

    def closed(self) -> bool:
        """True if the server closed the connection (after any answers)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _exact(self, n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not out, "connection closed in the middle of an answer"
                return None
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def loaded(mounts):
    """A mount with one file partly filled and a snapshot of what is stored."""
    m = mounts(read_timeout=2.0, keep_cache=True)
    f = SeedFile("stored", 40 * BLOCK_SIZE + 100)
    with m.client() as c:
        f.ino = c.create_file(ROOT_INO, f.name, f.size)
        c.fill_blocks(f.ino, make_blocks(f, range(0, 30)))
        c.fill_blocks(f.ino, make_blocks(f, [40]))
    snapshot = _snapshot(m, f)
    yield m, f, snapshot
    assert _snapshot(m, f) == snapshot, "stored data changed"
    validate_present(m, f)


def _snapshot(m, f) -> dict:
    with m.client() as c:
        s = c.status()
        return {"ranges": c.filled_ranges(f.ino), "names": sorted(os.listdir(m.path)),
                "present": s["blocks_present"], "files": s["files"],
                "stat": os.stat(m / f.name).st_size}


def validate_present(m, f: SeedFile) -> None:
    with m.client() as c:
        ranges = c.filled_ranges(f.ino)
    fd = os.open(m / f.name, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for start, end in ranges:
            want = b"".join(expected_blocks(f, range(start, end)))
            assert os.pread(fd, len(want), start * BLOCK_SIZE) == want
    finally:
        os.close(fd)


def assert_mount_works(m) -> None:
    with m.client() as c:
        assert c.server["version"] == wire.VERSION
        assert c.status()["pending_reads"] == 0
    assert os.listdir(m.path)


# --- frames that cannot be accepted: error answer, then the connection closes -------

BAD_FRAMES = {
    "not a frame at all": b"GET / HTTP/1.1\r\nHost: incfs\r\n\r\n",
    "wrong version": frame(Op.HELLO, 1, {}, version=wire.VERSION + 1),
    "version zero": frame(Op.STATUS, 1, {}, version=0),
    "oversized (length > 64 MiB)": HEADER.pack(wire.MAX_FRAME + 1, wire.VERSION, Op.FILL_BLOCKS, 1),
    "length 4 GiB - 1": HEADER.pack(0xFFFFFFFF, wire.VERSION, Op.HELLO, 1) + b"x" * 100,
    "payload too short": HEADER.pack(2, wire.VERSION, Op.HELLO, 1) + b"\0\0",
    "JSON length past the frame": (HEADER.pack(12, wire.VERSION, Op.HELLO, 1)
                                   + struct.pack("<I", 1000) + b'{"a": 1}'),
    "malformed JSON": frame(Op.STATUS, 1, b"{not json"),
    "JSON not an object": frame(Op.STATUS, 1, b"[1, 2, 3]"),
    "JSON not UTF-8": frame(Op.STATUS, 1, b'{"a": "\xff\xfe"}'),
    "integer as a string": frame(Op.CREATE_FILE, 1, {"parent": "1", "name": "x", "size": 1}),
    "boolean as an integer": frame(Op.FILLED_RANGES, 1, {"ino": True}),
    "name not a string": frame(Op.MKDIR, 1, {"parent": ROOT_INO, "name": 5}),
    "block slice outside the tail": frame(Op.FILL_BLOCKS, 1, {
        "ino": 2, "blocks": [{"index": 0, "offset": 0, "length": 4096}]}, b"short tail"),
    "negative block slice": frame(Op.FILL_BLOCKS, 1, {
        "ino": 2, "blocks": [{"index": 0, "offset": -10, "length": 4}]}, b"tail"),
    "unknown compression": frame(Op.FILL_BLOCKS, 1, {
        "ino": 2, "blocks": [{"index": 0, "offset": 0, "length": 4, "compression": "gzip"}]},
        b"tail"),
}


@pytest.mark.parametrize("what", list(BAD_FRAMES))
def test_bad_frame_gets_an_error_and_a_closed_connection(loaded, what):
    m, _f, _snap = loaded
    raw = Raw(m)
    try:
        raw.send(BAD_FRAMES[what])
        got = raw.answer()
        assert got is not None, "no answer"
        op, _rid, answer, _tail = got
        assert op == Op.RESPONSE
        assert answer["ok"] is False and answer["errno"] == errno.EPROTO, answer
        assert raw.closed()
    finally:
        raw.close()
    assert_mount_works(m)


# --- requests that are wrong but well framed: an answer, and the connection lives ---

def test_bad_requests_keep_the_connection(loaded):
    m, f, _snap = loaded
    raw = Raw(m)
    try:
        cases = [
            (frame(999, 11, {}), errno.EOPNOTSUPP),
            (frame(Op.RESPONSE, 12, {}), errno.EOPNOTSUPP),  # an answer sent as a request
            (frame(0, 13, {}), errno.EOPNOTSUPP),
            (frame(Op.CREATE_FILE, 14, {"parent": ROOT_INO, "name": "x"}), errno.EINVAL),
            (frame(Op.FILL_BLOCKS, 15, {"ino": f.ino, "blocks": ["x"]}), errno.EINVAL),
            (frame(Op.FILL_BLOCKS, 16, {"ino": f.ino, "blocks": 7}), errno.EINVAL),
            (frame(Op.FILL_BLOCKS, 17, {"ino": 10 ** 30, "blocks": []}), errno.ENOENT),
            (frame(Op.FILL_BLOCKS, 18, {"ino": ROOT_INO, "blocks": []}), errno.EINVAL),
            (frame(Op.CREATE_FILE, 19, {"parent": ROOT_INO, "name": "stored", "size": 1}),
             errno.EEXIST),
            (frame(Op.CREATE_FILE, 20, {"parent": ROOT_INO, "name": "", "size": 1}),
             errno.EINVAL),
            (frame(Op.CREATE_FILE, 21, {"parent": ROOT_INO, "name": "n" * 256, "size": 1}),
             errno.ENAMETOOLONG),
            (frame(Op.CREATE_FILE, 22, {"parent": f.ino, "name": "x", "size": 1}),
             errno.ENOTDIR),
            (frame(Op.CREATE_FILE, 23, {"parent": ROOT_INO, "name": "x", "size": -1}),
             errno.EFBIG),
            (frame(Op.CREATE_FILE, 24, {"parent": ROOT_INO, "name": "x", "size": 1,
                                         "metadata": "00" * 513}), errno.E2BIG),
            (frame(Op.CREATE_FILE, 25, {"parent": ROOT_INO, "name": "x", "size": 1,
                                         "file_id": "zz"}), errno.EINVAL),
            (frame(Op.LOOKUP, 26, {"parent": ROOT_INO, "name": "missing"}), errno.ENOENT),
            (frame(Op.UNLINK, 27, {"parent": ROOT_INO, "name": "missing"}), errno.ENOENT),
            (frame(Op.LINK, 28, {"ino": ROOT_INO, "parent": ROOT_INO, "name": "root"}),
             errno.EINVAL),
            (frame(Op.PENDING_READS, 29, {"timeout": "soon"}), errno.EINVAL),
        ]
        for data, code in cases:
            raw.send(data)
            op, rid, answer, _tail = raw.answer()
            assert op == Op.RESPONSE and rid == HEADER.unpack(data[:HEADER.size])[3]
            assert answer["ok"] is False and answer["errno"] == code, (answer, code)
        raw.send(frame(Op.HELLO, 99, {}))  # still usable
        _op, rid, answer, _tail = raw.answer()
        assert rid == 99 and answer["ok"] and answer["version"] == wire.VERSION
    finally:
        raw.close()
    assert "x" not in os.listdir(m.path)


def test_out_of_order_and_pipelined_frames(loaded):
    """No handshake is required, request ids need not grow, and answers to
    pipelined requests come back in order with their ids."""
    m, f, _snap = loaded
    raw = Raw(m)
    try:
        # a fill before any HELLO, with a request id of 0
        data = make_blocks(f, [35])[0]
        raw.send(frame(Op.FILL_BLOCKS, 0, {"ino": f.ino, "blocks": [
            {"index": 35, "offset": 0, "length": len(data[1]), "compression": data[2]}]},
            data[1]))
        _op, rid, answer, _tail = raw.answer()
        assert rid == 0 and answer["ok"] and answer["stored"] == 1
        ids = [7, 3, 0xFFFFFFFF, 3, 1]
        raw.send(b"".join([frame(Op.STATUS, ids[0], {}), frame(Op.HELLO, ids[1], {}),
                           frame(Op.LOOKUP, ids[2], {"parent": ROOT_INO, "name": f.name}),
                           frame(999, ids[3], {}),
                           frame(Op.FILLED_RANGES, ids[4], {"ino": f.ino})]))
        answers = [raw.answer() for _ in ids]
        assert [a[1] for a in answers] == ids
        assert answers[0][2]["ok"] and "files" in answers[0][2]
        assert answers[2][2]["ino"] == f.ino
        assert answers[3][2]["errno"] == errno.EOPNOTSUPP
        assert [35, 36] in answers[4][2]["data"]
        raw.send(frame(Op.HELLO, 5, {}))  # a HELLO late in the conversation is fine
        assert raw.answer()[2]["ok"]
    finally:
        raw.close()
    # the block filled above is there, and nothing else changed
    after = _snapshot(m, f)
    assert after["ranges"] == [(0, 30), (35, 36), (40, 41)]
    assert after["present"] == loaded[2]["present"] + 1
    loaded[2].update(after)  # what the fixture compares against at the end


# --- fills the server must refuse, block by block ------------------------------------

def test_refused_blocks(loaded):
    m, f, _snap = loaded
    with m.client() as c:
        good = make_blocks(f, [31])[0]
        cases = [
            ([(f.blocks, bytes(BLOCK_SIZE))], errno.EINVAL),  # past EOF
            ([(f.blocks + 1000, bytes(BLOCK_SIZE))], errno.EINVAL),
            ([(-1, bytes(BLOCK_SIZE))], errno.EINVAL),
            ([(32, bytes(BLOCK_SIZE - 1))], errno.EINVAL),  # a raw block of the wrong size
            ([(32, bytes(BLOCK_SIZE + 1))], errno.EINVAL),
            ([(32, b"\x00garbage" * 10, "lz4")], errno.EBADMSG),  # does not decode
            ([(32, b"\x28\xb5\x2f\xfd junk", "zstd")], errno.EBADMSG),
            ([(32, bytes(3 * BLOCK_SIZE), "lz4")], errno.EINVAL),  # too big to be a block
            ([(0, bytes(BLOCK_SIZE), "none", "hash")], errno.EINVAL),  # no hash tree
        ]
        for blocks, code in cases:
            with pytest.raises(FillError) as raised:
                c.fill_blocks(f.ino, blocks)
            assert raised.value.errno == code, (blocks[0][:1], raised.value)
            assert raised.value.result["stored"] == 0
        # a batch mixing good and bad blocks stores the good ones
        with pytest.raises(FillError) as raised:
            c.fill_blocks(f.ino, [good, (f.blocks, bytes(BLOCK_SIZE))])
        assert raised.value.result["stored"] == 1
        assert c.fill_blocks(f.ino, [good]) == 0  # and a refill is a no-op
        # the same block twice in one batch: the first copy counts
        assert c.fill_blocks(f.ino, make_blocks(f, [32]) + [(32, b"\x01" * BLOCK_SIZE)]) >= 1
        assert errno_of(c.fill_blocks, 10 ** 9, []) == errno.ENOENT
        # a tail block must have the tail's size (refills of present blocks
        # are no-ops before any check, so this uses a new file)
        tail = c.create_file(ROOT_INO, "tail", BLOCK_SIZE + 100)
        assert errno_of(c.fill_blocks, tail, [(1, bytes(BLOCK_SIZE))]) == errno.EINVAL
        assert c.fill_blocks(tail, [(1, b"t" * 100)]) == 1
    assert (m / "tail").stat().st_size == BLOCK_SIZE + 100
    validate_present(m, f)
    loaded[2].update(_snapshot(m, f))
    assert loaded[2]["ranges"] == [(0, 30), (31, 33), (40, 41)]
    assert loaded[2]["names"] == ["stored", "tail"]


# --- clients that go away -------------------------------------------------------------

def test_client_disconnecting_mid_message(loaded):
    m, f, _snap = loaded
    blocks = make_blocks(f, range(30, 40))
    tail = b"".join(b[1] for b in blocks)
    specs, offset = [], 0
    for index, data, kind in blocks:
        specs.append({"index": index, "offset": offset, "length": len(data), "compression": kind})
        offset += len(data)
    whole = frame(Op.FILL_BLOCKS, 1, {"ino": f.ino, "blocks": specs}, tail)
    for cut in (3, HEADER.size, HEADER.size + 2, HEADER.size + 40, len(whole) - 1):
        raw = Raw(m)
        raw.send(whole[:cut])
        raw.close()
    # a big message, abandoned half way
    raw = Raw(m)
    raw.send(HEADER.pack(wire.MAX_FRAME, wire.VERSION, Op.FILL_BLOCKS, 1) + b"\0" * (8 << 20))
    raw.close()
    # a client that closes while waiting for pending reads
    raw = Raw(m)
    raw.send(frame(Op.PENDING_READS, 1, {"timeout": 30}))
    raw.close()
    time.sleep(0.2)
    assert_mount_works(m)
    with m.client() as c:
        assert c.filled_ranges(f.ino) == [(0, 30), (40, 41)]  # nothing half stored


def test_too_many_connections(loaded):
    m, _f, _snap = loaded
    held = [Raw(m) for _ in range(MAX_CONNECTIONS)]
    try:
        for raw in held[:3]:
            raw.send(frame(Op.HELLO, 1, {}))
            assert raw.answer()[2]["ok"]
        extra = Raw(m)
        extra.send(frame(Op.HELLO, 1, {}))
        got = extra.answer()
        assert got is not None and got[2]["errno"] == errno.EMFILE
        extra.close()
    finally:
        for raw in held:
            raw.close()
    time.sleep(0.2)
    assert_mount_works(m)


# --- kill -9 of the daemon --------------------------------------------------------------

def test_kill_9_keeps_every_acknowledged_block(mounts):
    # no supervisor: it would start a new daemon on the cache at once, and
    # this test remounts the cache itself after the death
    m = mounts(keep_cache=True, supervise=False)
    f = SeedFile("victim", 16_000 * BLOCK_SIZE + 11)
    acked: list[int] = []
    created: list[str] = []
    errors: list[BaseException] = []
    with m.client() as c:
        f.ino = c.create_file(ROOT_INO, f.name, f.size)
    order = list(range(f.blocks))
    random.Random(9).shuffle(order)

    def filler():
        try:
            with m.client() as c:
                for start in range(0, len(order), 64):
                    batch = order[start:start + 64]
                    c.fill_blocks(f.ino, make_blocks(f, batch))
                    acked.extend(batch)
        except (ConnectionError, OSError) as e:
            errors.append(e)

    def creator():
        try:
            with m.client() as c:
                for i in range(100_000):
                    c.create_file(ROOT_INO, f"n{i}", i)
                    created.append(f"n{i}")
        except (ConnectionError, OSError) as e:
            errors.append(e)

    workers = [threading.Thread(target=filler), threading.Thread(target=creator)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while (len(acked) < 1500 or len(created) < 50) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = m.pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    for w in workers:
        w.join(30)
    assert wait_gone(pid)
    assert len(errors) == 2  # both clients saw the daemon die
    assert 0 < len(acked) < f.blocks

    # the dead mount has to go first
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True)
    assert not is_mounted(m.path)
    m.start()
    with m.client() as c:
        present = set()
        for start, end in c.filled_ranges(f.ino):
            present.update(range(start, end))
        assert set(acked) <= present
        for name in created:
            c.lookup(ROOT_INO, name)
    validate_present(m, f)  # everything present (acked or not) is the right data
    for name in created[-5:]:
        assert os.path.getsize(m / name) == int(name[1:])
    # and the image keeps working
    with m.client() as c:
        rest = sorted(set(range(f.blocks)) - present)
        for start in range(0, len(rest), 1024):
            c.fill_blocks(f.ino, make_blocks(f, rest[start:start + 1024]))
    validate_file(m.path, f)


# --- the example loader of docs/protocol.md -------------------------------------------

LOADER = Path(__file__).resolve().parents[1] / "examples" / "loader.py"


def test_example_loader_serves_a_directory_lazily(mounts, tmp_path):
    from conftest import build_sample_tree  # tests/conftest.py's tree of edge cases
    src = build_sample_tree(tmp_path / "src", big=3 << 20, deep=6)
    m = mounts(keep_cache=True)

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(LOADER), str(m.path), str(src)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            proc.kill()
            raise AssertionError(f"loader did not start: {line!r} {proc.stderr.read()}")
        return proc

    loader = start()
    try:
        status = m.status()
        assert status["blocks_present"] == 0 and status["files"] > 10
        assert (m / "text.txt").read_bytes() == (src / "text.txt").read_bytes()
        status = m.status()
        assert 0 < status["blocks_present"] < status["blocks_total"]  # only what was read
    finally:
        loader.terminate()
        loader.wait(10)

    m.restart()  # the same image: the loader finds its names there and goes on
    loader = start()
    try:
        done = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(m.path)],
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        want = subprocess.run(["fsverity", "digest", str(src / "big.bin")],
                              capture_output=True, check=True).stdout.split()[0]
        assert os.getxattr(m / "big.bin", "user.incfs.verity_digest") == want
    finally:
        loader.terminate()
        loader.wait(10)
    assert m.status()["complete"]


def test_protocol_doc_shows_the_example_loader_verbatim():
    doc = (LOADER.parents[1] / "docs" / "protocol.md").read_text()
    section = doc.split("## Example loader", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert shown == LOADER.read_text()
