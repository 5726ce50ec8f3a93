"""Lazy start over an emulated link (R8, DESIGN "numbers to reach"): nginx in
a network namespace behind a 100 Mbit/s tbf link with 20 ms RTT
(`incfs.testing.link.shaped_http_server`). A program that reads 10% of a
256 MiB image, in clusters at random places, must not pull much more than it
reads. Asserted on bytes (a ratio), not on times; the times are printed."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.testing.link import shaped_http_server

from test_loader_util import MiB, mounted, status

RATE_BIT = 100_000_000
RTT = 0.020
FILES = 4
FILE_SIZE = 64 * MiB  # 256 MiB in all
CLUSTER = 512 * 1024
READ = 128 * 1024

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_reading_ten_percent_fetches_about_ten_percent(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"part{i}.bin").write_bytes(random.Random(i).randbytes(FILE_SIZE))
    www = tmp_path / "www"
    www.mkdir()
    pack(src, www / "app.img", compress="none")
    size = (www / "app.img").stat().st_size
    rng = random.Random(3)
    total = FILES * FILE_SIZE
    clusters = [(rng.randrange(FILES), rng.randrange(0, FILE_SIZE - CLUSTER) // 4096 * 4096)
                for _ in range(total // 10 // CLUSTER)]
    expected = {}
    for part, off in clusters:
        with open(src / f"part{part}.bin", "rb") as f:
            f.seek(off)
            expected[(part, off)] = f.read(CLUSTER)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with shaped_http_server(www, RTT, RATE_BIT) as server:
        config = MountConfig(source=server.url("app.img"), mountpoint=str(mnt),
                             cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                             prefetch="none", read_timeout=120)
        t0 = time.monotonic()
        with mounted(config):
            mount_s = time.monotonic() - t0
            t1 = time.monotonic()
            with open(mnt / "part0.bin", "rb") as f:
                f.read(4096)
            first_read_s = time.monotonic() - t1
            t2 = time.monotonic()
            nread = 0
            for part, off in clusters:
                fd = os.open(mnt / f"part{part}.bin", os.O_RDONLY)
                try:
                    # a random-access program: no kernel readahead past what it reads
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    got = b"".join(os.pread(fd, READ, o) for o in range(off, off + CLUSTER, READ))
                finally:
                    os.close(fd)
                assert got == expected[(part, off)]
                nread += len(got)
            run_s = time.monotonic() - t2
            s = status(mnt)
    full_download_s = size * 8 / RATE_BIT
    figures = {"mount_s": round(mount_s, 3), "first_read_ms": round(first_read_s * 1000, 1),
               "run_s": round(run_s, 2), "full_download_s_at_link_rate": round(full_download_s, 1),
               "bytes_read": nread, "bytes_fetched": s["bytes_fetched"],
               "bytes_transferred": s["loader"]["bytes_transferred"],
               "metadata_bytes": s["loader"]["metadata_bytes"],
               "requests": s["loader"]["requests"], "miss_latency": s["miss_latency"]}
    print("link figures:", json.dumps(figures))
    assert nread >= total // 10 - CLUSTER
    assert s["bytes_fetched"] <= 1.5 * nread
    assert s["loader"]["bytes_transferred"] + s["loader"]["metadata_bytes"] <= 1.5 * nread
    assert s["reads_failed"] == 0
