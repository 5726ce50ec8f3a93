"""The built-in loader (issue 4): mounting packed images from http (nginx),
s3 (moto) and a local path through a cache; resume, offline remounts,
updates that reuse blocks, and prefetch profiles.

Real FUSE mounts through `incfs.mount`, real servers: nginx from Debian,
`incfs.serve.RangeServer`, and for S3 moto's standalone server (no real S3
server is installable here)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import trio

from incfs import BLOCK_SIZE
from incfs.format.layout import LOG_START, RecordType, SuperFlags
from incfs.format.log import scan_log
from incfs.format.records import BlockKind
from incfs.image import Image
from incfs.loader import (Want, cache_metadata, fetch_metadata, plan_ranges, retype_record,
                          source_runs, write_cache)
from incfs.loader.prefetch import source_runs_in_slices
from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.serve import RangeServer
from incfs.sources import open_source
from incfs.testing.nginx import Nginx

from test_loader_util import (MiB, assert_cache_clean, make_tree, mounted, status,
                              tree_files, wait_complete, wait_for)


@pytest.fixture
def served(tmp_path):
    """A directory served by nginx; returns (directory, nginx)."""
    root = tmp_path / "www"
    root.mkdir()
    with Nginx(root) as nginx:
        yield root, nginx


def _random_tree(root: Path, seed: int = 7, big: int = 6 * MiB) -> Path:
    rng = random.Random(seed)
    files = {
        "bin/app": rng.randbytes(big),
        "bin/tool": rng.randbytes(300 * 1024) + bytes(200 * 1024),
        "share/text.txt": b"".join(b"line %d of some text\n" % i for i in range(40000)),
        "share/small": b"tiny\n",
        "empty": b"",
        "deep/a/b/c/leaf": rng.randbytes(5000),
    }
    return make_tree(root, files)


def _config(tmp_path, source, **kw) -> MountConfig:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    kw.setdefault("allow_unsigned", True)
    kw.setdefault("read_timeout", 60)
    kw.setdefault("cache", str(tmp_path / "cache.img"))
    return MountConfig(source=source, mountpoint=str(mnt), **kw)


def _assert_same(mnt: Path, src: Path) -> None:
    want = tree_files(src)
    got = tree_files(mnt)
    assert sorted(got) == sorted(want)
    for rel, data in want.items():
        assert got[rel] == data, rel


# --- pure parts ---------------------------------------------------------------------------

def test_the_rest_of_the_metadata_is_asked_for_before_the_first_answer_ends(tmp_path):
    """Metadata past the first request: its ranges are asked for as soon as
    the superblock is in, while the first answer still streams. The first
    answer here stops after the superblock until a second read starts (it
    would wait forever if the rest came only after it)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):  # ~100 KB of metadata, past the 64 KiB first request
        (src / f"f{i:03d}").write_bytes(os.urandom(5000))
    image = tmp_path / "img"
    pack(src, image, compress="none")
    whole = image.read_bytes()

    async def fetch():
        async with open_source(str(image)) as source:
            rest_started = trio.Event()
            plain_read = source.read

            async def read(offset, length):
                rest_started.set()
                return await plain_read(offset, length)

            async def read_prefix(offset, length, needed):
                head = await plain_read(offset, length)
                assert needed(head[:4096]) == len(meta_end_of(head))
                await rest_started.wait()
                return head

            source.read, source.read_prefix = read, read_prefix
            with trio.fail_after(10):
                return await fetch_metadata(source, first_read=64 * 1024)

    def meta_end_of(head: bytes) -> bytes:
        from incfs.format.layout import Superblock
        return whole[:Superblock.decode(head[:4096]).meta_end]

    sb, meta = trio.run(fetch)
    assert sb.meta_end > 64 * 1024 and meta == whole[:sb.meta_end]


@pytest.mark.parametrize("index", [True, False], ids=["index", "log"])
def test_cache_metadata_retypes_block_maps(tmp_path, index):
    """A log image's BLOCKS become SOURCE_BLOCKS; an indexed image's INDEX
    travels as it is (its maps then say where blocks are in the source)."""
    src = _random_tree(tmp_path / "src", big=MiB)
    image = tmp_path / "img"
    pack(src, image, compress="zstd", index=index)

    async def fetch():
        async with open_source(str(image)) as source:
            return await fetch_metadata(source, first_read=8192)  # forces a second request
    sb, meta = trio.run(fetch)
    assert len(meta) == sb.meta_end
    cached = cache_metadata(meta, sb)
    types = []
    scan_log(io.BytesIO(cached), len(cached), lambda off, h, body: types.append(h.type))
    if index:
        assert types == [RecordType.INDEX] == _types(meta)
    else:
        assert RecordType.BLOCKS not in types and RecordType.SOURCE_BLOCKS in types
        assert types.count(RecordType.SOURCE_BLOCKS) == _types(meta).count(RecordType.BLOCKS)

    cache = write_cache(tmp_path / "cache.img", sb, meta)
    try:
        assert cache.superblock.flags & SuperFlags.CACHE
        assert not cache.superblock.flags & SuperFlags.PACKED
        assert cache.superblock.uuid == sb.uuid
        assert cache.appender.end == sb.meta_end  # fills follow the copied metadata
        totals = cache.totals()
        assert totals["blocks_present"] == 0 and totals["blocks_total"] > 0
        node = cache.ns.lookup(cache.ns.lookup(1, b"bin").ino, b"app")
        data_map, hash_map = cache.source_maps[node.ino]
        assert data_map.present == data_map.count == node.data.count
        assert hash_map.present == hash_map.count
        with Image.open(image) as original:
            onode = original.ns.lookup(original.ns.lookup(1, b"bin").ino, b"app")
            assert list(onode.data.entries()) == list(data_map.entries())
    finally:
        cache.close()


def _types(meta: bytes) -> list[int]:
    out = []
    scan_log(io.BytesIO(meta), len(meta), lambda off, h, body: out.append(h.type))
    return out


def test_retype_record_keeps_links_and_fixes_crc(tmp_path):
    pack(_random_tree(tmp_path / "src", big=64 * 1024), tmp_path / "img", compress="none",
         index=False)  # BLOCKS records: the log layout
    raw = (tmp_path / "img").read_bytes()
    from incfs.format.layout import RECORD_HEADER_SIZE, RecordHeader, Superblock
    sb = Superblock.decode(raw)
    offset = LOG_START
    while offset < sb.meta_end:
        header = RecordHeader.decode(raw[offset:offset + RECORD_HEADER_SIZE])
        if header.type == RecordType.BLOCKS:
            record = raw[offset:offset + header.length]
            new = retype_record(record, RecordType.SOURCE_BLOCKS)
            nh = RecordHeader.decode(new[:RECORD_HEADER_SIZE])
            assert (nh.type, nh.length, nh.prev, nh.body_len) == \
                (RecordType.SOURCE_BLOCKS, header.length, header.prev, header.body_len)
            assert RecordHeader.check(new[:RECORD_HEADER_SIZE],
                                      new[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + nh.body_len])
            assert new[RECORD_HEADER_SIZE:] == record[RECORD_HEADER_SIZE:]
            return
        offset += header.length
    pytest.fail("no BLOCKS record found")


def test_plan_ranges_coalesces_and_bounds():
    def w(i, off, size=BLOCK_SIZE):
        return Want(0, i, off, size, BlockKind.RAW if size else BlockKind.ZERO, 0)

    wants = [w(i, 1_000_000 + i * BLOCK_SIZE) for i in range(100)]
    ranges = plan_ranges(wants, max_len=256 * 1024, max_gap=0)
    assert [r.length for r in ranges] == [256 * 1024, 100 * BLOCK_SIZE - 256 * 1024]
    assert sum(len(r.wants) for r in ranges) == 100
    # gaps: joined up to max_gap, split beyond
    gappy = [w(0, 0), w(1, 3 * BLOCK_SIZE), w(2, 100 * BLOCK_SIZE)]
    assert [(r.offset, r.length) for r in plan_ranges(gappy, 1 << 20, 2 * BLOCK_SIZE)] == \
        [(0, 4 * BLOCK_SIZE), (100 * BLOCK_SIZE, BLOCK_SIZE)]
    # zero blocks need no bytes; duplicates (deduplicated blocks) share a range
    assert plan_ranges([w(0, 0, 0)], 1 << 20, 0) == []
    dup = plan_ranges([w(0, 8192), w(1, 8192)], 1 << 20, 0)
    assert len(dup) == 1 and dup[0].length == BLOCK_SIZE and len(dup[0].wants) == 2


def test_source_runs_follow_the_data_region(tmp_path):
    pack(_random_tree(tmp_path / "src", big=MiB), tmp_path / "img", compress="zstd")
    with Image.open(tmp_path / "img") as img:
        sb = img.superblock
        maps = {n.ino: (n.data, n.hashes) for n in img.ns.inodes.values() if n.data is not None}
        runs = source_runs(maps)
        offsets = [r[0] for r in runs if r[0]]
        assert offsets == sorted(offsets)
        assert all(sb.data_start <= o < sb.data_end for o in offsets)
        covered = sum(r[4] for r in runs)
        assert covered == sum(d.count + (h.count if h else 0) for d, h in maps.values())
        # worked out in the loop a slice at a time, the runs are the same
        checkpoints = 0

        async def sliced():
            nonlocal checkpoints

            async def count_checkpoints():
                nonlocal checkpoints
                while True:
                    await trio.lowlevel.checkpoint()
                    checkpoints += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(count_checkpoints)
                await trio.lowlevel.checkpoint()
                got = await source_runs_in_slices(maps, slice_blocks=8)
                nursery.cancel_scope.cancel()
            return got

        assert trio.run(sliced) == runs
        assert checkpoints >= 2  # other tasks ran between the slices


# --- mounts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("supervise", [True, False])
def test_the_daemon_gets_the_connections_mount_background_opened(tmp_path, served, supervise):
    """mount_background opens the source's TCP connections before the daemon
    starts (incfs.preconnect); they reach the daemon through the supervisor's
    fork (or straight, unsupervised) and carry its requests: the first, the
    metadata's, read without the HTTP client (incfs.loader.early), the
    first reads' (incfs.loader.ondemand), then the loader's source's."""
    from incfs.loader.config import DEFAULTS

    root, nginx = served
    src = _random_tree(tmp_path / "src", big=MiB)
    pack(src, root / "app.img", compress="zstd")
    with mounted(_config(tmp_path, nginx.url("app.img"), prefetch="none",
                         supervise=supervise)) as mnt:
        _assert_same(mnt, src)
        loader = status(mnt)["loader"]
        source = loader["sources"][0]
        # all of them: the metadata's came back once its answer was read
        # whole (incfs.loader.tail)
        assert source["early_connections"] == DEFAULTS.warm_connections
        assert source["early_requests"] >= 1
        assert loader["errors"] == 0 and status(mnt)["reads_failed"] == 0
    assert preconnect_env_is_ours_only()


def preconnect_env_is_ours_only() -> bool:
    """The caller's environment never gets the variable (only the child's)."""
    from incfs import preconnect

    return preconnect.ENV not in os.environ


def test_mount_from_http_nginx_signed(tmp_path, served, keys):
    root, nginx = served
    src = _random_tree(tmp_path / "src")
    private, public = keys("ed25519")
    pack(src, root / "app.img", compress="zstd", sign_key=private)
    config = _config(tmp_path, nginx.url("app.img"), allow_unsigned=False, key=str(public),
                     prefetch="none")
    started = time.monotonic()
    with mounted(config) as mnt:
        mounted_after = time.monotonic() - started
        # the tree is there as soon as mount returns
        assert sorted(os.listdir(mnt)) == ["bin", "deep", "empty", "share"]
        assert (mnt / "bin" / "app").stat().st_size == 6 * MiB
        # what is here came with the metadata's answer (incfs.loader.tail)
        s = wait_for(lambda: (st := status(mnt))["loader"]["first_answer"] != "waiting"
                     and st, 30, what="the first answer's rest")
        assert s["blocks_present"] == s["loader"]["first_answer_blocks"] and s["signed"]
        assert s["loader"]["metadata_bytes"] > 0 and s["loader"]["state"] in ("created", "online")
        t0 = time.monotonic()
        head = (mnt / "bin" / "tool").read_bytes()[:4096]
        first_read = time.monotonic() - t0
        assert head == (src / "bin" / "tool").read_bytes()[:4096]
        _assert_same(mnt, src)
        s = status(mnt)
        assert s["bytes_fetched"] > 0 and s["loader"]["requests"] > 0
        assert s["reads_failed"] == 0 and s["verify_failures"] == 0
        # metadata came in one request, the rest in ranged requests only
        log = nginx.requests()
        assert log and all(e.status == 206 and e.range for e in log if e.method == "GET")
    print(f"mount {mounted_after:.3f}s, first read {first_read * 1000:.1f} ms")
    assert_cache_clean(tmp_path / "cache.img")


def test_mount_from_s3_moto(tmp_path, monkeypatch):
    """No real S3 server is installable here: this runs against moto's
    standalone server (moto.server.ThreadedMotoServer) on loopback."""
    import boto3
    from moto.server import ThreadedMotoServer

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    src = _random_tree(tmp_path / "src", big=2 * MiB)
    pack(src, tmp_path / "app.img", compress="lz4")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="images")
        client.upload_file(str(tmp_path / "app.img"), "images", "v1/app.img")
        config = _config(tmp_path, "s3://images/v1/app.img", prefetch="sequential",
                         source_options={"endpoint_url": endpoint, "region": "us-east-1"})
        with mounted(config) as mnt:
            assert (mnt / "share" / "small").read_bytes() == b"tiny\n"
            _assert_same(mnt, src)
            s = wait_complete(mnt)
            assert s["loader"]["source"] == "s3://images/v1/app.img"
            assert s["loader"]["complete"]
    finally:
        server.stop()
        if getattr(server, "_server", None) is not None:
            server._server.server_close()
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def test_mount_local_image_with_cache(tmp_path):
    src = _random_tree(tmp_path / "src")
    pack(src, tmp_path / "app.img", compress="zstd")
    config = _config(tmp_path, str(tmp_path / "app.img"), prefetch="sequential")
    with mounted(config) as mnt:
        _assert_same(mnt, src)
        s = wait_complete(mnt)
        assert s["loader"]["prefetch"]["mode"] == "sequential"
        assert s["loader"]["prefetch"]["state"] == "done"
        assert s["bytes_fetched"] > 0
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def test_resume_after_umount_mid_download(tmp_path):
    src = _random_tree(tmp_path / "src", big=12 * MiB)
    pack(src, tmp_path / "app.img", compress="none")
    size = (tmp_path / "app.img").stat().st_size
    with RangeServer(tmp_path / "app.img") as server:
        # a slow background download, cut short by the unmount
        config = _config(tmp_path, server.url, prefetch="sequential", bandwidth=4 * MiB)
        with mounted(config) as mnt:
            t0 = time.monotonic()
            wait_for(lambda: status(mnt)["bytes_fetched"] > 3 * MiB, 30, what="some progress")
            # the cap holds: after a burst of at most 1 MiB, 4 MiB/s (unshaped: ~30 ms)
            assert time.monotonic() - t0 >= 0.4
            first = status(mnt)
            assert not first["complete"] and first["loader"]["bandwidth"] == 4 * MiB
        with Image.open(tmp_path / "cache.img") as cache:
            present = cache.totals()["blocks_present"]
            assert 0 < present < cache.totals()["blocks_total"]
        assert_cache_clean(tmp_path / "cache.img", complete=False)
        config.bandwidth = None
        before = server.stats.bytes_sent
        with mounted(config) as mnt:
            s = status(mnt)
            assert s["loader"]["state"] in ("resumed", "online")
            assert s["loader"]["metadata_bytes"] == 0  # nothing fetched again to resume
            assert s["blocks_present"] >= present
            _assert_same(mnt, src)
            s = wait_complete(mnt)
        resumed = server.stats.bytes_sent - before
        # the second mount fetched (about) only what the first had not
        assert resumed < size - (present - 64) * BLOCK_SIZE
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def test_offline_remount_of_complete_cache(tmp_path, served):
    root, nginx = served
    src = _random_tree(tmp_path / "src")
    pack(src, root / "app.img", compress="zstd")
    config = _config(tmp_path, nginx.url("app.img"), prefetch="sequential")
    with mounted(config) as mnt:
        wait_complete(mnt)
    nginx.stop()  # no server at all from here on
    started = time.monotonic()
    with mounted(config) as mnt:
        elapsed = time.monotonic() - started
        s = status(mnt)
        assert s["complete"] and s["loader"]["complete"]
        assert s["loader"]["offline"] and "unreachable" in s["loader"]["offline"]
        _assert_same(mnt, src)
        assert status(mnt)["bytes_fetched"] == 0
    assert elapsed < 15
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def test_offline_incomplete_cache_reads_what_it_has_and_recovers(tmp_path):
    src = _random_tree(tmp_path / "src")
    pack(src, tmp_path / "app.img", compress="zstd")
    image = tmp_path / "app.img"
    server = RangeServer(image).start()
    port = server.port
    try:
        config = _config(tmp_path, server.url, prefetch="none", read_timeout=2)
        with mounted(config) as mnt:
            assert (mnt / "share" / "small").read_bytes() == b"tiny\n"
    finally:
        server.stop()
    with mounted(config) as mnt:
        assert "unreachable" in status(mnt)["loader"]["offline"]
        assert (mnt / "share" / "small").read_bytes() == b"tiny\n"  # present: no network
        with pytest.raises(OSError) as err:
            (mnt / "bin" / "tool").read_bytes()
        assert err.value.errno == 62  # ETIME: absent and the source is away
        server = RangeServer(image, port=port).start()  # the source comes back
        try:
            wait_for(lambda: _reads(mnt / "bin" / "tool"), 30, interval=0.5,
                     what="reads to work again")
            _assert_same(mnt, src)
            assert status(mnt)["loader"]["state"] == "online"
        finally:
            server.stop()


def _reads(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


def test_update_reuses_identical_blocks(tmp_path, served):
    root, nginx = served
    rng = random.Random(99)
    common = {f"lib/part{i}.bin": rng.randbytes(2 * MiB) for i in range(4)}
    v1 = make_tree(tmp_path / "v1", {**common, "app": rng.randbytes(MiB), "old": b"gone\n"})
    changed_app = rng.randbytes(MiB)
    new_file = rng.randbytes(512 * 1024)
    v2 = make_tree(tmp_path / "v2", {**common, "app": changed_app, "new.bin": new_file})
    pack(v1, tmp_path / "v1.img", compress="zstd")
    pack(v2, tmp_path / "v2.img", compress="zstd")
    shutil.copy(tmp_path / "v1.img", root / "app.img")
    config = _config(tmp_path, nginx.url("app.img"), prefetch="sequential")
    with mounted(config) as mnt:
        wait_complete(mnt)
        _assert_same(mnt, v1)
    os.replace(tmp_path / "v2.img", root / "app.img")  # a new version at the same URL
    with mounted(config) as mnt:
        s = status(mnt)
        assert s["loader"]["state"] in ("updated", "online")
        assert s["loader"]["base"].endswith("cache.img.old")
        _assert_same(mnt, v2)
        s = wait_complete(mnt)
        changed = len(changed_app) + len(new_file)
        metadata_slack = 256 * 1024  # metadata, hash trees and range rounding
        assert s["bytes_reused"] > 6 * MiB
        assert s["bytes_fetched"] < changed + metadata_slack, s
        assert s["loader"]["bytes_transferred"] < changed + metadata_slack
        wait_for(lambda: not (tmp_path / "cache.img.old").exists(), 10,
                 what="the old cache to go once the new one is complete")
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def test_base_cache_option_reuses_blocks_on_demand(tmp_path, served):
    """`base_cache`: any older image (here the v1 image file itself) lends its
    identical blocks; with prefetch off, each miss gets its hash blocks
    first and copies what the base has."""
    root, nginx = served
    rng = random.Random(3)
    common = {f"lib/part{i}.bin": rng.randbytes(MiB) for i in range(3)}
    v1 = make_tree(tmp_path / "v1", {**common, "app": rng.randbytes(MiB)})
    v2 = make_tree(tmp_path / "v2", {**common, "app": rng.randbytes(MiB)})
    pack(v1, tmp_path / "v1.img", compress="lz4")
    pack(v2, root / "app.img", compress="lz4")
    config = _config(tmp_path, nginx.url("app.img"), prefetch="none",
                     base_cache=str(tmp_path / "v1.img"))
    with mounted(config) as mnt:
        _assert_same(mnt, v2)
        s = status(mnt)
        assert s["bytes_reused"] > 2 * MiB
        assert s["bytes_fetched"] < MiB + 128 * 1024, s
        assert s["loader"]["base"] == str(tmp_path / "v1.img")
    assert (tmp_path / "v1.img").exists()  # a base given by the user is left alone
    assert_cache_clean(tmp_path / "cache.img")


def test_profile_record_and_replay(tmp_path, served):
    from incfs import profile

    root, nginx = served
    rng = random.Random(5)
    src = make_tree(tmp_path / "src", {"a.bin": rng.randbytes(2 * MiB),
                                       "b.bin": rng.randbytes(2 * MiB),
                                       "c/c.bin": rng.randbytes(2 * MiB)})
    pack(src, root / "app.img", compress="none")
    # a first run reads these blocks, in this order
    order = [("c/c.bin", 300), ("c/c.bin", 301), ("a.bin", 7), ("b.bin", 400),
             ("a.bin", 250), ("c/c.bin", 10)]
    config = _config(tmp_path, nginx.url("app.img"), prefetch="none")
    with mounted(config) as mnt:
        for rel, index in order:
            fd = os.open(mnt / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # exactly these blocks
                assert os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE) == \
                    (src / rel).read_bytes()[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
            finally:
                os.close(fd)
        count = profile.record(mnt, tmp_path / "profile.json")
    recorded = json.loads((tmp_path / "profile.json").read_text())
    assert recorded["version"] == 1
    assert [tuple(b) for b in recorded["blocks"]] == order
    assert count == len(order)

    # replay: a fresh cache fetches the profiled blocks before anything else
    nginx.clear_requests()
    replay = _config(tmp_path, nginx.url("app.img"), prefetch=f"profile:{tmp_path}/profile.json",
                     cache=str(tmp_path / "cache2.img"), max_inflight=4)
    with mounted(replay) as mnt:
        wait_complete(mnt)
    with Image.open(root / "app.img") as img:
        where = {}
        for rel, index in order:
            node = img.ns.inodes[_ino(img, rel)]
            where[(rel, index)] = node.data.get(index)[0]
        data_floor = min(off for n in img.ns.inodes.values() if n.data is not None
                         for _, off, _, _ in n.data.entries() if off)
    data_requests = []
    for entry in nginx.requests():
        if entry.range is None:
            continue  # the loader's HEAD
        start, end = (int(x) for x in entry.range.split("=")[1].split("-"))
        if start >= data_floor:
            data_requests.append((start, end))
    first_seen = []
    for start, end in data_requests:
        hit = [k for k, off in where.items() if start <= off <= end and k not in first_seen]
        if not hit and len(first_seen) < len(order):
            pytest.fail(f"data request {start}-{end} came before all profiled blocks: "
                        f"{first_seen}")
        first_seen.extend(sorted(hit, key=order.index))
        if len(first_seen) == len(order):
            break
    # profile order, per file in order of first appearance
    files_in_order = list(dict.fromkeys(rel for rel, _ in order))
    assert list(dict.fromkeys(rel for rel, _ in first_seen)) == files_in_order


def _ino(img, rel: str) -> int:
    ino = 1
    for part in rel.split("/"):
        ino = img.ns.lookup(ino, part.encode()).ino
    return ino


def test_pending_reads_go_before_prefetch(tmp_path):
    from incfs.testing.faultproxy import FaultProxy

    src = _random_tree(tmp_path / "src", big=12 * MiB)
    pack(src, tmp_path / "app.img", compress="none")
    with RangeServer(tmp_path / "app.img") as server:
        host, port = server.base_url.split("//")[1].strip("/").split(":")
        with FaultProxy((host, int(port)), rate_down=2_000_000) as proxy:  # ~7 s for all
            config = _config(tmp_path, proxy.url("/app.img"), prefetch="sequential")
            with mounted(config) as mnt:
                # prefetch is under way (it starts 0.5 s after the mount when
                # nothing reads: Service.settled)
                wait_for(lambda: status(mnt)["loader"]["prefetch"]["blocks"] > 0, 10,
                         what="prefetch to start")
                fd = os.open(mnt / "bin" / "app", os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    last = 12 * MiB - BLOCK_SIZE  # far from where prefetch is
                    got = os.pread(fd, BLOCK_SIZE, last)
                finally:
                    os.close(fd)
                s = status(mnt)
                assert got == (src / "bin" / "app").read_bytes()[last:]
                assert not s["complete"]  # served long before prefetch would reach it
                # the read is served as its block comes in, and the loader's
                # status is written when the job ends, a moment later
                s = wait_for(lambda: (st := status(mnt))["loader"]["pending_jobs"] >= 1 and st,
                             10, what="the read's job in the status")
                assert s["loader"]["prefetch"]["blocks"] > 0


def test_a_miss_fetches_one_amplified_range(tmp_path, served):
    root, nginx = served
    src = _random_tree(tmp_path / "src")
    pack(src, root / "app.img", compress="none")
    config = _config(tmp_path, nginx.url("app.img"), prefetch="none", amplify=128 * 1024)
    with mounted(config) as mnt:
        time.sleep(0.2)  # let the warm-up requests finish
        # and the blocks of the metadata's answer be stored (incfs.loader.tail)
        wait_for(lambda: status(mnt)["loader"]["first_answer"] != "waiting", 30,
                 what="the first answer's rest")
        fetched_before = status(mnt)["bytes_fetched"]
        nginx.clear_requests()
        fd = os.open(mnt / "bin" / "app", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, BLOCK_SIZE, 100 * BLOCK_SIZE)
            # the neighbours came with it: no further request
            os.pread(fd, BLOCK_SIZE, 131 * BLOCK_SIZE)
        finally:
            os.close(fd)
        with Image.open(root / "app.img") as img:
            node = img.ns.inodes[_ino(img, "bin/app")]
            block_100 = node.data.get(100)[0]
        data = [e for e in nginx.requests() if e.range
                and int(e.range.split("=")[1].split("-")[0]) >= block_100]
        assert len(data) == 1, data
        start, end = (int(x) for x in data[0].range.split("=")[1].split("-"))
        assert (start, end - start + 1) == (block_100, 128 * 1024)
        fetched = status(mnt)["bytes_fetched"] - fetched_before
        assert fetched < 128 * 1024 + 3 * BLOCK_SIZE + 1


def test_wrong_key_refuses_the_mount(tmp_path, served, keys):
    from incfs.errors import IncfsError

    root, nginx = served
    private, _ = keys("ed25519")
    _, other_public = keys("ed25519", 1)
    pack(_random_tree(tmp_path / "src", big=MiB), root / "app.img", sign_key=private)
    config = _config(tmp_path, nginx.url("app.img"), allow_unsigned=False,
                     key=str(other_public))
    with pytest.raises(IncfsError):
        with mounted(config):
            pass
    assert not os.path.ismount(config.mountpoint)
    config.allow_unsigned, config.key = False, None
    with pytest.raises(IncfsError, match="signed"):
        with mounted(config):
            pass
