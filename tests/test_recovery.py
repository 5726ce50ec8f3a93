"""Crash and tear: truncated, torn and bit-flipped images open safely (only
IncfsError), keep every intact record, and never return wrong data."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RawImage, assert_image_matches, run_incfs
from incfs import BLOCK_SIZE, ROOT_INO, codec
from incfs.errors import IncfsError, IntegrityError
from incfs.format.index import IndexDamage
from incfs.format.layout import RecordHeader, RecordType, Superblock
from incfs.format.records import BlockKind, InodeEntry, TreeKind, encode_inodes
from incfs.image import FillBlock, Image, MissingBlock
from incfs.integrity import merkle
from incfs.pack import pack
from incfs.verify import NOTE, verify_image

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _source_files(src: Path) -> dict[bytes, bytes]:
    out = {}
    base = os.fsencode(src)
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                with open(full, "rb") as f:
                    out[b"/" + os.path.relpath(full, base)] = f.read()
    return out


def check_never_wrong(img: Image, files: dict[bytes, bytes], *, allow_bad: bool) -> int:
    """Every name the image shows exists in the source with the same size,
    and every block that reads back equals the source. Returns the number of
    blocks read back. With allow_bad, damaged blocks may be refused
    (IntegrityError), and so may damaged index chunks (IndexDamage, EIO: a
    walk that meets one fails, as that listing would on a mount); absent
    blocks are always allowed to be missing."""
    good = 0
    try:
        walked = list(img.ns.walk())
    except IndexDamage:
        assert allow_bad
        return good
    for path, node in walked:
        try:
            good += _check_file(img, path, node, files, allow_bad)
        except IndexDamage:  # its block map's chunk: the file fails to open
            assert allow_bad, path
    return good


def _check_file(img: Image, path: bytes, node, files: dict[bytes, bytes],
                allow_bad: bool) -> int:
    if node.data is None:
        return 0
    assert path in files, path
    data = files[path]
    assert node.size == len(data), path
    good = 0
    for i, _off, _info, _crc in list(node.data.entries()):
        try:
            block = img.read_block(node, i)
        except MissingBlock:
            continue
        except IntegrityError:
            assert allow_bad, (path, i)
            continue
        assert block == data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], (path, i)
        good += 1
    return good


# --- a packed image -----------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(small_tree, keys, tmp_path_factory):
    image = tmp_path_factory.mktemp("packed") / "packed.img"
    pack(small_tree, image, compress="zstd", sign_key=keys("ed25519")[0])
    return image, RawImage(image), _source_files(small_tree)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch") / "cut.img"


def _open_bytes(path: Path, data: bytes) -> Image | None:
    path.write_bytes(data)
    try:
        return Image.open(path)
    except IncfsError:
        return None


def test_truncation_at_every_record_boundary(packed, scratch):
    image, raw, files = packed
    bounds = raw.boundaries()
    full = len(raw.data)
    assert bounds[-1] == full
    for k, cut in enumerate(bounds):
        img = _open_bytes(scratch, bytes(raw.data[:cut]))
        if k == 0:
            assert img is None  # not even the root directory is there
            continue
        assert img is not None, k
        with img:
            assert img.scan.records == k  # every record before the cut is kept
            assert img.scan.end == cut and img.scan.dropped_bytes == 0
            types = [RecordType(h.type) for _o, h in raw.records()[:k]]
            assert (img.signature is not None) == (RecordType.SIGNATURE in types)
            if RecordType.DIRENTS in types:
                assert {p for p, _n in img.ns.walk() if p} >= {b"/one", b"/text.txt"}
            read = check_never_wrong(img, files, allow_bad=False)
            # a packed image keeps its blocks after the maps: none count until
            # the DATA record holding them is whole
            assert read == 0 if cut < full else read > 0


@SETTINGS
@given(data=st.data())
def test_truncation_at_random_offsets(packed, scratch, data):
    _image, raw, files = packed
    bounds = raw.boundaries()
    cut = data.draw(st.one_of(st.integers(0, len(raw.data)),
                              st.integers(0, bounds[-2] + 64)), label="cut")
    img = _open_bytes(scratch, bytes(raw.data[:cut]))
    whole = [b for b in bounds if b <= cut]
    if img is None:
        assert len(whole) <= 1  # only a cut before the first record ends fails
        return
    with img:
        assert img.scan.end == whole[-1]
        assert img.scan.records == len(whole) - 1
        assert img.scan.dropped_bytes == cut - whole[-1]
        check_never_wrong(img, files, allow_bad=False)


def _flip_strategy(raw: RawImage):
    meta_end = Superblock.decode(bytes(raw.data[:BLOCK_SIZE])).meta_end
    position = st.one_of(st.integers(0, meta_end + 64), st.integers(0, len(raw.data) - 1))
    return st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8)


@SETTINGS
@given(data=st.data())
def test_bit_flips_never_give_wrong_data(packed, scratch, data):
    _image, raw, files = packed
    flips = data.draw(_flip_strategy(raw), label="flips")
    damaged = bytearray(raw.data)
    for offset, bit in flips:
        damaged[offset] ^= 1 << bit
    img = _open_bytes(scratch, bytes(damaged))
    if img is None:
        return
    with img:
        check_never_wrong(img, files, allow_bad=True)
        report = verify_image(scratch)  # verify survives it too
        assert report.exit_code in (0, 1)


def test_half_written_record_is_dropped_and_reported(packed, tmp_path):
    image, raw, files = packed
    size = len(raw.data)
    last = raw.records()[-1][0]
    body = encode_inodes([InodeEntry(999, stat.S_IFREG | 0o644, 5)])
    header = RecordHeader(int(RecordType.INODES), 0, (32 + len(body) + 7) // 8 * 8, last,
                          len(body))
    record = header.encode(body) + body
    torn = tmp_path / "torn.img"
    torn.write_bytes(bytes(raw.data) + record[:len(record) // 2])
    with Image.open(torn) as img:
        assert img.scan.records == len(raw.records())
        assert img.scan.end == size
        assert img.scan.dropped_bytes == len(record) // 2
        assert "cut short" in img.scan.dropped_reason
        assert 999 not in img.ns.inodes
        assert check_never_wrong(img, files, allow_bad=False) > 0
    report = verify_image(torn)
    assert report.exit_code == 0 and report.dropped_bytes == len(record) // 2
    notes = [p.message for p in report.problems if p.severity == NOTE]
    assert any("dropped" in m and "cut short" in m for m in notes)
    proc = run_incfs("verify", torn)
    assert proc.returncode == 0 and "dropped" in proc.stdout
    info = json.loads(run_incfs("inspect", "--json", torn).stdout)
    assert info["recovery"]["dropped_bytes"] == len(record) // 2
    assert not info["recovery"]["clean"]
    # a writable open cuts the torn tail off, and the image is clean again
    Image.open(torn, writable=True).close()
    assert torn.stat().st_size == size
    with Image.open(torn) as img:
        assert img.scan.dropped_bytes == 0


def test_truncated_packed_image_is_reported(packed, tmp_path, one_line_error):
    image, raw, _files = packed
    cut = tmp_path / "cut.img"
    cut.write_bytes(bytes(raw.data[:len(raw.data) - 3 * BLOCK_SIZE - 5]))
    report = verify_image(cut)
    assert report.exit_code == 1 and not report.complete
    text = [str(p) for p in report.problems]
    assert any("image is truncated" in t for t in text)
    assert any(t.startswith("/links/hard-a (also /text.txt): data blocks 0-27: absent")
               for t in text)
    one_line_error(run_incfs("verify", cut), 1, "integrity check failed")


# --- a live (loader-filled) image -------------------------------------------------------

def _build_live(path: Path, seed: int = 7):
    """An image filled block by block the way a loader fills a cache, with a
    snapshot (log end, present blocks) after each change."""
    rng = random.Random(seed)
    files = {
        b"/a": rng.randbytes(5 * BLOCK_SIZE + 17),
        b"/b": bytes(3 * BLOCK_SIZE) + b"tail",
        b"/sub/c": b"compressible " * 2000,
        b"/sub/d": rng.randbytes(300 * BLOCK_SIZE),  # two hash levels
    }
    img = Image.create(path)
    img.durable = False
    present: set[tuple[int, int, int]] = set()
    snaps = [(img.appender.end, frozenset())]
    sub = img.create_node(ROOT_INO, b"sub", stat.S_IFDIR | 0o555)
    snaps.append((img.appender.end, frozenset()))
    kinds = [BlockKind.RAW, BlockKind.LZ4, BlockKind.ZSTD]
    for path_name, data in files.items():
        parent = sub if path_name.startswith(b"/sub/") else ROOT_INO
        root, tree = merkle.tree_of_bytes(data)
        ino = img.create_node(parent, path_name.rsplit(b"/", 1)[1], stat.S_IFREG | 0o444,
                              size=len(data), root_hash=root)
        snaps.append((img.appender.end, frozenset(present)))
        if tree:
            assert img.fill(ino, [FillBlock(i, b, tree=TreeKind.HASH)
                                  for i, b in enumerate(tree)]).stored == len(tree)
            present |= {(ino, 1, i) for i in range(len(tree))}
            snaps.append((img.appender.end, frozenset(present)))
        order = list(range(merkle.block_count(len(data))))
        rng.shuffle(order)
        for start in range(0, len(order), 7):
            batch = []
            for i in order[start:start + 7]:
                kind, stored = codec.compress(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE],
                                              rng.choice(kinds))
                batch.append(FillBlock(i, stored, kind))
            assert img.fill(ino, batch).stored == len(batch)
            present |= {(ino, 0, b.index) for b in batch}
            snaps.append((img.appender.end, frozenset(present)))
    img.unlink(ROOT_INO, b"b")
    snaps.append((img.appender.end, frozenset(present)))
    img.close()
    return files, snaps


def _present(img: Image) -> set[tuple[int, int, int]]:
    out = set()
    for node in img.ns.inodes.values():
        for tree, bmap in ((0, node.data), (1, node.hashes)):
            for i, *_rest in (bmap.entries() if bmap else ()):
                out.add((node.ino, tree, i))
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "live.img"
    files, snaps = _build_live(path)
    return path, RawImage(path), files, snaps


def _expected(snaps, cut: int) -> frozenset:
    return max((s for s in snaps if s[0] <= cut), key=lambda s: s[0])[1]


def test_live_image_truncated_at_every_record_boundary(live, scratch):
    _path, raw, files, snaps = live
    with_unlinked = dict(files)
    for k, cut in enumerate(raw.boundaries()):
        img = _open_bytes(scratch, bytes(raw.data[:cut]))
        if k == 0:
            assert img is None  # the root directory is the first record
            continue
        assert img is not None, k
        with img:
            assert img.scan.records == k and img.scan.end == cut
            assert _present(img) == _expected(snaps, cut)  # exactly the intact fills
            check_never_wrong(img, with_unlinked, allow_bad=False)


@SETTINGS
@given(data=st.data())
def test_live_image_truncated_inside_records(live, scratch, data):
    _path, raw, files, snaps = live
    cut = data.draw(st.integers(0, len(raw.data)), label="cut")
    img = _open_bytes(scratch, bytes(raw.data[:cut]))
    whole = [b for b in raw.boundaries() if b <= cut]
    if img is None:
        assert len(whole) <= 1
        return
    with img:
        assert img.scan.end == whole[-1]
        assert _present(img) == _expected(snaps, whole[-1])
        check_never_wrong(img, files, allow_bad=False)


@SETTINGS
@given(data=st.data())
def test_live_image_bit_flips(live, scratch, data):
    _path, raw, files, _snaps = live
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw.data) - 1), st.integers(0, 7)),
                               min_size=1, max_size=6), label="flips")
    damaged = bytearray(raw.data)
    for offset, bit in flips:
        damaged[offset] ^= 1 << bit
    img = _open_bytes(scratch, bytes(damaged))
    if img is not None:
        with img:
            check_never_wrong(img, files, allow_bad=True)


def test_torn_fill_can_be_redone(live, tmp_path):
    path, raw, files, snaps = live
    # cut in the middle of the last DATA record: that fill never happened
    last_data = [o for o, h in raw.records() if h.type == RecordType.DATA][-1]
    torn = tmp_path / "torn.img"
    torn.write_bytes(bytes(raw.data[:last_data + 100]))
    with Image.open(torn, writable=True) as img:
        assert img.scan.dropped_bytes == 100
        before = _present(img)
        node = img.ns.lookup(img.ns.lookup(ROOT_INO, b"sub").ino, b"d")
        data = files[b"/sub/d"]
        missing = node.data.missing(0, node.data.count)
        assert missing
        result = img.fill(node.ino, [FillBlock(i, data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                                     for i in missing])
        assert result.stored == len(missing) and not result.errors
    with Image.open(torn) as img:
        assert img.scan.dropped_bytes == 0
        assert _present(img) > before
        node = img.ns.lookup(img.ns.lookup(ROOT_INO, b"sub").ino, b"d")
        assert node.complete
        assert img.read_range(node, 0, node.size) == files[b"/sub/d"]


def test_zero_filled_tail_is_dropped(packed, tmp_path):
    _image, raw, files = packed
    padded = tmp_path / "padded.img"
    padded.write_bytes(bytes(raw.data) + bytes(10 * BLOCK_SIZE))
    with Image.open(padded) as img:
        assert img.scan.dropped_reason.endswith("zero-filled tail")
        assert img.scan.dropped_bytes == 10 * BLOCK_SIZE
        assert check_never_wrong(img, files, allow_bad=False) > 0


def test_packed_image_round_trips_after_recovery(packed, small_tree, tmp_path):
    image, raw, _files = packed
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes(raw.data) + b"\x49\x52\x45\x43garbage")
    with Image.open(copy) as img:
        assert_image_matches(img, small_tree)
