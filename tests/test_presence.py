"""The presence picture on real mounts: the PRESENCE control request,
`incfs status --map [PATH]` in the terminal and `--png FILE`."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib

import pytest

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.integrity.merkle import tree_of_bytes
from incfs.presence import ABSENT_RGB, PRESENT_RGB, Presence
from mounting import errno_of, mounts  # noqa: F401 - fixture

INCFS = [sys.executable, "-m", "incfs.cli"]


def incfs(*args) -> subprocess.CompletedProcess:
    return subprocess.run(INCFS + [os.fspath(a) for a in args], capture_output=True,
                          text=True, timeout=120)


def _fill(c, ino: int, indexes) -> None:
    c.fill_blocks(ino, [(i, bytes([i % 251]) * BLOCK_SIZE) for i in indexes])


@pytest.fixture
def three_files(mounts):
    """a: 64 blocks, first half present; b: 10 blocks, 3 and 7 present;
    c: 5 blocks, none present; and a directory."""
    m = mounts()
    with m.client() as c:
        inos = [c.create_file(ROOT_INO, n, size=k * BLOCK_SIZE)
                for n, k in (("a", 64), ("b", 10), ("c", 5))]
        c.mkdir(ROOT_INO, "d")
        _fill(c, inos[0], range(32))
        _fill(c, inos[1], [3, 7])
    return m, inos


def test_presence_request(three_files):
    m, (a, b, cc) = three_files
    with m.client() as c:
        files, more = c.presence(ino=b)
        assert not more
        assert files == [{"ino": b, "size": 10 * BLOCK_SIZE, "blocks": 10, "present": 2,
                          "data": [[3, 4], [7, 8]]}]
        every = c.presence_all()
        assert [f["ino"] for f in every] == [a, b, cc]
        assert [f["data"] for f in every] == [[[0, 32]], [[3, 4], [7, 8]], []]
        # pages of one file each come out the same
        page, more = c.presence(limit=1)
        assert [f["ino"] for f in page] == [a] and more
        page, more = c.presence(after_ino=a, limit=1)
        assert [f["ino"] for f in page] == [b] and more
        page, more = c.presence(after_ino=cc, limit=1)
        assert page == [] and not more
        assert errno_of(c.presence, ino=ROOT_INO) == errno.EINVAL  # a directory
        assert errno_of(c.presence, ino=10 ** 6) == errno.ENOENT
    with m.client() as c:  # a wrong type is a protocol error: that connection ends
        assert errno_of(c.presence, ino="1") == errno.EPROTO
    with m.client() as c:
        assert c.status()["files"] == 3


def test_presence_of_hash_blocks(mounts):
    m = mounts()
    data = os.urandom(300 * BLOCK_SIZE)
    root, tree = tree_of_bytes(data)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "v", size=len(data), root_hash=root)
        c.fill_blocks(ino, [(i, tree[i], "none", "hash") for i in range(len(tree))])
        c.fill_blocks(ino, [(0, data[:BLOCK_SIZE])])
        (f,), _ = c.presence(ino=ino)
    assert f["hash_blocks"] == len(tree) and f["hash"] == [[0, len(tree)]]
    assert f["data"] == [[0, 1]] and f["present"] == 1


def test_status_map_terminal(three_files):
    m, _ = three_files
    proc = incfs("status", m, "--map")
    assert proc.returncode == 0, proc.stderr
    head, grid = proc.stdout.split("\n", 1)
    assert "image: 34/79 data blocks present" in head
    cells = [ch for ch in grid if ch in "█▒·"]
    legend = 3
    assert len(cells) - legend == 79  # one cell per block: fewer blocks than cells
    assert cells[:32] == ["█"] * 32 and cells[32:64] == ["·"] * 32
    proc = incfs("status", m, "--map", "b")
    assert proc.returncode == 0, proc.stderr
    assert "b: 2/10 data blocks present" in proc.stdout
    assert "".join(ch for ch in proc.stdout if ch in "█▒·")[:10] == "···█···█··"


def test_status_map_bad_paths(three_files, tmp_path):
    m, _ = three_files
    for path, words in (("nope", "No such file"), (str(tmp_path), "not inside the mount")):
        proc = incfs("status", m, "--map", path)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    proc = incfs("status", tmp_path, "--map")
    assert proc.returncode == 2 and "not an incfs mount" in proc.stderr


def _decode_png(raw: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of a PNG as presence.png_bytes writes it."""
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(raw):
        (length,), kind = struct.unpack(">I", raw[pos:pos + 4]), raw[pos + 4:pos + 8]
        body = raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    pixels = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    rows = [pixels[r * stride:(r + 1) * stride] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def test_status_png(three_files, tmp_path):
    m, _ = three_files
    out = tmp_path / "a.png"
    proc = incfs("status", m, "--map", "a", "--png", out)
    assert proc.returncode == 0, proc.stderr
    width, height, rows = _decode_png(out.read_bytes())
    # 64 blocks: an 8 x 8 grid of cells, 32 pixels each; the top half present
    assert (width, height) == (256, 256)
    assert rows[0][:3] == bytes(PRESENT_RGB) and rows[127][-3:] == bytes(PRESENT_RGB)
    assert rows[128][:3] == bytes(ABSENT_RGB) and rows[255][-3:] == bytes(ABSENT_RGB)
    whole = tmp_path / "all.png"
    proc = incfs("status", m, "--png", whole)
    assert proc.returncode == 0 and whole.exists()
    assert _decode_png(whole.read_bytes())[0] > 0


@pytest.mark.parametrize("total, ranges, n", [
    (79, [(0, 32), (67, 68), (71, 72)], 1024), (10 ** 7, [(5, 9_000_001)], 1024),
    (1000, [(i, i + 1) for i in range(0, 1000, 3)], 7), (3, [], 10),
])
def test_cells_add_up(total, ranges, n):
    p = Presence("x", total, ranges)
    cells = p.cells(n)
    k = min(n, total)
    sizes = [-(-(i + 1) * total // k) - -(-i * total // k) for i in range(k)]
    assert len(cells) == k and sum(sizes) == total
    assert round(sum(f * s for f, s in zip(cells, sizes))) == p.present
    assert all(0.0 <= f <= 1.0 for f in cells)
