"""The loader against failing servers: a server that dies mid-transfer, 503s,
connection resets, truncated bodies, 200 instead of 206, a wrong
Content-Range, corrupted bytes, and mirrors. In every case reads either wait
(and finish once the server is back) or fail with EIO (never with wrong
data), and nothing wrong is ever stored in the cache."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.serve import RangeServer
from incfs.testing.faultproxy import FaultProxy
from incfs.testing.nginx import Nginx

from test_loader_util import (MiB, BadServer, ReadThread, assert_cache_clean, make_tree,
                              mounted, status, wait_complete, wait_for)


@pytest.fixture
def image(tmp_path):
    rng = random.Random(11)
    files = {"big.bin": rng.randbytes(4 * MiB), "small.bin": rng.randbytes(100 * 1024),
             "other.bin": rng.randbytes(MiB)}
    src = make_tree(tmp_path / "src", files)
    (tmp_path / "www").mkdir()
    target = tmp_path / "www" / "app.img"
    pack(src, target, compress="none")
    return target, files


def _config(tmp_path, url, **kw) -> MountConfig:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    kw.setdefault("prefetch", "none")
    kw.setdefault("read_timeout", None)  # wait forever: a blip must not fail reads
    return MountConfig(source=url, mountpoint=str(mnt), cache=str(tmp_path / "cache.img"),
                       allow_unsigned=True, **kw)


def _upstream(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def test_resets_and_truncations_are_retried(tmp_path, image):
    path, files = image
    with RangeServer(path) as server, FaultProxy(_upstream(server.url)) as proxy:
        url = proxy.url("/" + path.name)
        with mounted(_config(tmp_path, url)) as mnt:
            proxy.reset_after(150_000, count=2)
            proxy.truncate_after(60_000, count=2)
            assert (mnt / "big.bin").read_bytes() == files["big.bin"]
            assert proxy.resets + proxy.truncations >= 2
            s = status(mnt)
            assert s["reads_failed"] == 0
            retried = sum(src["retries"] for src in s["loader"]["sources"]) + s["loader"]["retries"]
            assert retried >= 1
    assert_cache_clean(tmp_path / "cache.img")


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_server_dies_mid_transfer_and_comes_back(tmp_path, image):
    """nginx behind a 1 MB/s link (tbf in a namespace, so no proxy buffers
    the body for it) is stopped while the loader is receiving a range."""
    from incfs.testing.link import shaped_http_server

    path, files = image
    with shaped_http_server(path.parent, 0.002, 8_000_000) as server:
        revived = None
        try:
            with mounted(_config(tmp_path, server.url(path.name), amplify=1 << 20)) as mnt:
                reader = ReadThread(mnt / "big.bin")
                reader.start()
                wait_for(lambda: status(mnt)["bytes_fetched"] > 0, 20, what="a first block")
                server.nginx.stop()  # the server dies mid-transfer
                time.sleep(2.0)
                assert reader.is_alive(), reader.error  # the read waits; it does not fail
                assert status(mnt)["reads_failed"] == 0
                host, port = server.nginx.address
                revived = Nginx(path.parent, host=host, port=port,
                                netns=server.link.ns_name).start()  # back, same address
                reader.join(90)
                assert not reader.is_alive()
                assert reader.error is None
                assert reader.result == files["big.bin"]
                wait_for(lambda: sum(status(mnt)["source_errors"].values()) >= 1, 5,
                         what="the failures to show in status")
                assert status(mnt)["loader"]["state"] == "online"
                # `ip netns exec` gave the new nginx a copy of our mount
                # namespace, FUSE mount included (no propagation here): it
                # would keep the mount's connection alive after the unmount
                revived.stop()
        finally:
            if revived is not None:
                revived.stop()
    assert_cache_clean(tmp_path / "cache.img")


@pytest.mark.parametrize("mode", ["503", "short"])
def test_transient_answers_make_reads_wait(tmp_path, image, mode):
    path, files = image
    with BadServer(path) as server:
        with mounted(_config(tmp_path, server.url)) as mnt:
            server.mode = mode
            reader = ReadThread(mnt / "small.bin")
            reader.start()
            time.sleep(1.5)
            assert reader.is_alive()  # waiting, not failed
            server.mode = "ok"
            reader.join(60)
            assert not reader.is_alive() and reader.error is None
            assert reader.result == files["small.bin"]
            assert status(mnt)["reads_failed"] == 0
    assert_cache_clean(tmp_path / "cache.img")


def test_transient_answers_time_out_with_etime_when_configured(tmp_path, image):
    path, files = image
    with BadServer(path) as server:
        with mounted(_config(tmp_path, server.url, read_timeout=1.5)) as mnt:
            server.mode = "503"
            started = time.monotonic()
            with pytest.raises(OSError) as err:
                (mnt / "small.bin").read_bytes()
            assert err.value.errno == errno.ETIME
            assert time.monotonic() - started < 10
            server.mode = "ok"
            wait_for(lambda: _reads(mnt / "small.bin") == files["small.bin"], 60,
                     interval=0.5, what="the mount to recover")
    assert_cache_clean(tmp_path / "cache.img")


def _reads(path: Path):
    try:
        return path.read_bytes()
    except OSError:
        return None


@pytest.mark.parametrize("mode", ["full200", "badrange"])
def test_broken_range_answers_fail_reads_with_eio(tmp_path, image, mode):
    path, files = image
    with BadServer(path) as server:
        with mounted(_config(tmp_path, server.url)) as mnt:
            server.mode = mode
            reader = ReadThread(mnt / "other.bin")
            reader.start()
            reader.join(60)
            assert not reader.is_alive(), "a refused range must not hang the read"
            assert isinstance(reader.error, OSError) and reader.error.errno == errno.EIO
            s = status(mnt)
            assert s["reads_failed"] >= 1 and sum(s["source_errors"].values()) >= 1
            assert os.getxattr(mnt / "other.bin", "user.incfs.blocks").startswith(b"0/")
            server.mode = "ok"  # fixed: the next read works
            assert (mnt / "other.bin").read_bytes() == files["other.bin"]
    assert_cache_clean(tmp_path / "cache.img")


def test_corruption_in_transit_is_fetched_again(tmp_path, image):
    path, files = image
    with RangeServer(path) as server, FaultProxy(_upstream(server.url)) as proxy:
        url = proxy.url("/" + path.name)
        with mounted(_config(tmp_path, url, amplify=1 << 20)) as mnt:
            proxy.corrupt_at(300_000, count=1)  # one flipped byte, deep in a body
            assert (mnt / "big.bin").read_bytes() == files["big.bin"]
            assert proxy.corruptions == 1
            s = status(mnt)
            assert s["verify_failures"] >= 1
            assert s["loader"]["refetches"] >= 1
            assert s["loader"]["blocks_failed"] == 0 and s["reads_failed"] == 0
    assert_cache_clean(tmp_path / "cache.img")


def test_persistent_corruption_fails_reads_and_stores_nothing(tmp_path, image):
    path, files = image
    with BadServer(path) as server:
        with mounted(_config(tmp_path, server.url)) as mnt:
            server.mode = "corrupt"
            reader = ReadThread(mnt / "other.bin")
            reader.start()
            reader.join(60)
            assert not reader.is_alive(), "a block that never verifies must not hang the read"
            assert isinstance(reader.error, OSError) and reader.error.errno == errno.EIO
            s = status(mnt)
            # one block per answer is damaged: those are never stored (the rest is fine)
            present, count = map(int, os.getxattr(mnt / "other.bin", "user.incfs.blocks").split(b"/"))
            assert present < count
            assert s["verify_failures"] >= 1 and s["reads_failed"] >= 1
            assert s["loader"]["blocks_failed"] >= 1
            server.mode = "ok"
            assert (mnt / "other.bin").read_bytes() == files["other.bin"]
    assert_cache_clean(tmp_path / "cache.img")


def test_mirrors_fail_over_and_refetch_elsewhere(tmp_path, image):
    path, files = image
    with BadServer(path) as bad, RangeServer(path) as good:
        # a dead first mirror, then one that corrupts, then a good one
        dead = "http://127.0.0.1:9/" + path.name
        config = _config(tmp_path, bad.url, mirrors=[dead, good.url], prefetch="sequential")
        with mounted(config) as mnt:
            bad.mode = "corrupt"
            assert (mnt / "big.bin").read_bytes() == files["big.bin"]
            s = wait_complete(mnt)
            assert s["reads_failed"] == 0 and s["loader"]["blocks_failed"] == 0
            mirrors = {m["name"]: m for m in s["loader"]["sources"]}
            assert len(mirrors) == 3
            assert mirrors[good.url]["bytes"] > 0
            assert s["verify_failures"] >= 1
    assert_cache_clean(tmp_path / "cache.img", complete=True)
