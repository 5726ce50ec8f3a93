"""Disk space (issue 13 item 1, issue 9 item 3): released blocks, the
RELEASED record on reopen, plain copies as the place of a file's bytes, the
cache cap's release order, gc and compact. Real images on disk, no mocks;
the mounted checks are in test_space_mount.py."""

from __future__ import annotations

import os
import random

import pytest

from incfs.errors import BadBlock, UsageError
from incfs.format.layout import RecordType
from incfs.format.records import BlockKind, info_kind
from incfs.image import Image, MissingBlock
from incfs.pack import pack
from incfs.space import gc
from incfs.space.cap import CHUNK, CacheCap, check, minimum
from incfs.space.compact import compact
from incfs.space.records import ReleasedRun, Where, decode_released, encode_released
from incfs.space.release import evict, release_to_plain
from incfs.space.sizes import parse_size
from incfs.testing import caches

from space_util import MiB, allocated, contents, filled_cache, node_of, packed, write_plain


def _read_all(img: Image, want: dict[str, bytes]) -> None:
    for path, data in want.items():
        node = node_of(img, path)
        assert img.read_range(node, 0, node.size) == data, path


def test_released_record_round_trip_and_rules():
    runs = [ReleasedRun(5, 0, 10, Where.PLAIN), ReleasedRun(7, 64, 64)]
    assert decode_released(encode_released(runs)) == runs
    with pytest.raises(Exception, match="length"):
        decode_released(encode_released(runs)[:-1])
    bad = bytearray(encode_released([ReleasedRun(5, 0, 1)]))
    bad[4 + 8] = 1  # tree = hash
    with pytest.raises(Exception, match="hash blocks"):
        decode_released(bytes(bad))


def test_parse_size():
    assert parse_size("32M") == 32 * MiB and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096 and parse_size("64kb") == 65536
    with pytest.raises(ValueError):
        parse_size("lots")


def test_plain_release_frees_the_image_and_reads_stay_right(tmp_path):
    image = packed(tmp_path)
    want = contents(tmp_path)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    before = allocated(cache)
    write_plain(img, big)
    freed = release_to_plain(img, big)
    assert freed >= 3 * MiB - 8192
    assert allocated(cache) <= before - 3 * MiB + 8192
    _read_all(img, want)
    img.close()
    # reopen: the RELEASED record says the bytes are in the plain copy
    with Image.open(cache) as again:
        assert node_of(again, "big").complete
        _read_all(again, want)


def test_plain_copy_gone_or_bad_is_never_served(tmp_path):
    image = packed(tmp_path)
    want = contents(tmp_path)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    plain = write_plain(img, big)
    release_to_plain(img, big)
    img.close()
    # wrong bytes in the copy: the Merkle check refuses them
    plain.chmod(0o600)
    with open(plain, "r+b") as f:
        f.seek(5000)
        f.write(b"X")
    with Image.open(cache, writable=True) as again:
        node = node_of(again, "big")
        assert again.read_range(node, 0, 4096) == want["big"][:4096]
        with pytest.raises(BadBlock):
            again.read_range(node, 4096, 4096)
        assert again.forget_block(node.ino, 0, 1)  # a cache fetches it again
        with pytest.raises(MissingBlock):
            again.read_range(node, 4096, 4096)
    # no copy at all: the blocks are absent at open (fetched again, or EIO)
    plain.unlink()
    with Image.open(cache, writable=True) as again:
        node = node_of(again, "big")
        assert node.data.present == 0 and not node.complete
        with pytest.raises(MissingBlock):
            again.read_range(node, 0, 10)
        _read_all(again, {k: v for k, v in want.items() if k != "big"})


def _racing(img: Image, give_up) -> list[int]:
    """Make `give_up` (a release) run once in the middle of the next read: after the read has looked its blocks up, before it reads their
    bytes, as a worker thread's release can. Returns the list the offsets
    read land in."""
    read_at: list[int] = []
    stored_bytes = img.stored_bytes

    def late(n, offset: int, length: int) -> bytes:
        if not read_at:
            give_up()
        read_at.append(offset)
        return stored_bytes(n, offset, length)

    img.stored_bytes = late
    return read_at


@pytest.mark.parametrize("compress", ["none", "zstd"])  # a raw run; blocks one by one
def test_a_read_that_races_a_release_reads_the_plain_copy(tmp_path, compress):
    """The release moves the blocks to the plain copy and punches their old
    bytes while the read holds the old places: the read finds the moved
    blocks, reads them again where they are now, and counts no failure."""
    rng = random.Random(7)
    (tmp_path / "src").mkdir()
    # a 16-letter alphabet: zstd halves it, so its blocks span whole pages
    # (a punch leaves a partly covered page's bytes in place)
    want = bytes(rng.choice(b"abcdefghijklmnop") for _ in range(MiB))
    (tmp_path / "src" / "half").write_bytes(want)
    image = tmp_path / "app.img"
    pack(tmp_path / "src", image, compress=compress)
    img = filled_cache(image, tmp_path / "cache.img")
    node = node_of(img, "half")
    kinds = {info_kind(node.data.get(i)[1]) for i in range(node.data.count)}
    assert kinds == ({BlockKind.ZSTD} if compress == "zstd" else {BlockKind.RAW})
    write_plain(img, node)
    read_at = _racing(img, lambda: release_to_plain(img, node))
    assert img.read_range(node, 0, node.size) == want
    assert read_at[0] < (1 << 62) <= read_at[-1]  # the image's place, then the copy's
    assert img.counters["verify_failures"] == 0
    img.close()


def test_a_read_that_races_an_eviction_waits_for_a_fetch(tmp_path):
    """Evicted while a read holds their old places: the blocks are absent
    (MissingBlock: fetched again), not bad (BadBlock: counted, repaired)."""
    image = packed(tmp_path)
    img = filled_cache(image, tmp_path / "cache.img")
    node = node_of(img, "big")
    _racing(img, lambda: evict(img, [(node.ino, 0, 16)]))
    with pytest.raises(MissingBlock):
        img.read_range(node, 0, 16 * 4096)
    assert img.counters["verify_failures"] == 0
    assert not node.data.is_present(0)
    img.close()


def test_a_plain_copy_forgotten_mid_read_keeps_its_descriptor(tmp_path, monkeypatch):
    """A plain copy found bad is forgotten while another thread may be
    preading it: its descriptor stays open until that pread ends, so the
    number is not handed to the next open file mid-read (whose bytes the
    read would get), and is closed after it."""
    image = packed(tmp_path)
    want = contents(tmp_path)["big"]
    img = filled_cache(image, tmp_path / "cache.img")
    node = node_of(img, "big")
    write_plain(img, node)
    release_to_plain(img, node)
    real_pread, held, opened = os.pread, [], []

    def pread(fd: int, length: int, offset: int) -> bytes:
        if fd != img.fd and not held:
            held.append(fd)
            img.plain.forget(node.ino)  # as another thread's drop_plain does
            opened.append(os.open(image, os.O_RDONLY))  # takes a freed number
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    data = img.read_range(node, 0, 64 * 4096)
    monkeypatch.undo()
    assert held and opened[0] != held[0]  # still open while the read held it
    assert data == want[:64 * 4096]
    assert img.counters["verify_failures"] == 0
    with pytest.raises(OSError):
        os.fstat(held[0])  # closed once the read let it go
    os.close(opened[0])
    assert img.read_range(node, 0, 4096) == want[:4096]  # opened again for the next read
    img.close()


def test_a_users_own_image_never_releases(tmp_path):
    image = packed(tmp_path)
    with Image.open(image, writable=True) as img:
        big = node_of(img, "big")
        write_plain(img, big)
        assert release_to_plain(img, big) == 0
        assert evict(img, [(big.ino, 0, CHUNK)]) == (0, 0)


def test_evicted_blocks_are_absent_after_reopen_and_refill(tmp_path):
    image = packed(tmp_path)
    want = contents(tmp_path)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    before = allocated(cache)
    blocks, punched = evict(img, [(big.ino, 0, CHUNK), (big.ino, 2 * CHUNK, 3 * CHUNK)])
    assert blocks == 2 * CHUNK and punched >= 2 * CHUNK * 4096 - 8192
    assert allocated(cache) < before - CHUNK * 4096
    img.close()
    with Image.open(cache) as again:
        node = node_of(again, "big")
        assert node.data.missing(0, 4 * CHUNK) == list(range(CHUNK)) + list(range(2 * CHUNK, 3 * CHUNK))
        assert again.read_range(node, CHUNK * 4096, 4096) == want["big"][CHUNK * 4096:][:4096]
    # the cache fills them again from the source image: all right once more
    _refill_from(image, cache, "big")
    with Image.open(cache) as again:
        _read_all(again, want)


def _refill_from(image, cache, path: str) -> None:
    with Image.open(image) as src, Image.open(cache, writable=True) as dst:
        caches.fill_from(src, dst, b"/" + path.encode())


def test_cap_releases_least_recently_used_first(tmp_path):
    image = packed(tmp_path, big=4 * MiB)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    cap = CacheCap(img, allocated(cache) + 64 * 1024)
    cap.touch(big.ino, 0, CHUNK - 1)  # the first chunk was just read
    with cap.pinned(big.ino, CHUNK * 4096, 4096):  # and a read works in the second
        cap.make_room(2 * MiB)
    assert allocated(cache) + 2 * MiB <= cap.cap
    assert big.data.is_present(0) and big.data.is_present(CHUNK)
    assert cap.counters["blocks_released"] >= 2 * MiB // 4096
    assert node_of(img, "big").hashes.complete  # hash blocks stay
    img.close()


def test_cap_below_metadata_and_trees_is_a_clear_error(tmp_path):
    image = packed(tmp_path)
    with filled_cache(image, tmp_path / "cache.img") as img:
        need = minimum(img)
        with pytest.raises(UsageError, match="too small for this image.*use at least"):
            check(img, need - 1)
        check(img, need)


def test_gc_reclaims_unlinked_files_and_unpunched_releases(tmp_path):
    image = packed(tmp_path)
    want = contents(tmp_path)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    # a release whose punch never happened (a crash right after the record)
    img.appender.append(RecordType.RELEASED,
                        encode_released([ReleasedRun(big.ino, 0, 4 * CHUNK)]))
    small = node_of(img, "d/small")
    img.unlink(node_of(img, "d").ino, b"small")
    img.close()
    before = allocated(cache)
    with Image.open(cache, writable=True) as again:
        result = gc.collect(again, unlinked=True)
    assert result.unlinked_files == 1 and result.blocks_released >= 2
    assert allocated(cache) <= before - 4 * CHUNK * 4096
    with Image.open(cache) as again:
        assert node_of(again, "big").data.present == node_of(again, "big").data.count - 4 * CHUNK
        assert again.ns.inodes[small.ino].data.present == 0
        rest = {k: v for k, v in want.items() if k not in ("big", "d/small")}
        _read_all(again, rest)


def test_compact_drops_dead_space_and_keeps_every_live_byte(tmp_path, keys):
    image = packed(tmp_path, sign_key=keys("ed25519")[0])
    want = contents(tmp_path)
    cache = tmp_path / "cache.img"
    img = filled_cache(image, cache)
    big = node_of(img, "big")
    img.appender.append(RecordType.RELEASED, encode_released([ReleasedRun(big.ino, 0, CHUNK)]))
    img.close()
    out = tmp_path / "compact.img"
    result = compact(cache, out)
    assert result.blocks_bad == 0 and result.size_after < result.size_before
    with Image.open(out) as c:
        node = node_of(c, "big")
        assert node.data.missing(0, node.data.count) == list(range(CHUNK))
        _read_all(c, {k: v for k, v in want.items() if k != "big"})
        assert c.read_range(node, CHUNK * 4096, 1 << 20) == want["big"][CHUNK * 4096:][:1 << 20]
        assert len(c.source_maps) == 4  # every file with data
        assert result.signature == "kept" and c.signature.root == c.signature.entry.root
    # in place, a file released to its plain copy stays released to it
    _refill_from(image, cache, "big")
    with Image.open(cache, writable=True) as img:
        big = node_of(img, "big")
        write_plain(img, big)
        release_to_plain(img, big)
    assert compact(cache).blocks_bad == 0
    with Image.open(cache) as c:
        assert c.plain_inos == {node_of(c, "big").ino}
        _read_all(c, want)


def test_cap_counters_are_prometheus_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from incfs.image import FillBlock
    from incfs.metrics import render

    image = packed(tmp_path)
    with filled_cache(image, tmp_path / "cache.img") as img, Image.open(image) as src:
        cap = CacheCap(img, allocated(tmp_path / "cache.img"))
        big = node_of(img, "big")
        cap.make_room(1 * MiB)
        caches.fill_from(src, img, b"/big")  # a loader fetches them again
        cap.after_fill(big.ino, [FillBlock(i, b"") for i in range(big.data.count)])
        text = render({"space": cap.status()})
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["incfs_cache_blocks_released_total"] > 0
    assert samples["incfs_cache_blocks_refetched_total"] == samples["incfs_cache_blocks_released_total"]
    assert samples["incfs_cache_size_bytes"] == cap.cap
