#!/usr/bin/env python3
"""Loader figures of issue 10 that bench/run.py does not take: one sequential
reader and 16 random readers over a shaped link (100 Mbit/s, 20 ms RTT, via
incfs.testing.link), as a fraction of the link rate, with the daemon's peak
RSS; and the time `mount_background` takes to a visible tree (loopback nginx).

    sudo .venv/bin/python bench/link_rate.py seq|rand|startup [--reps N]

Run it with PYTHONPATH pointing at the tree to measure (before/after).
Prints one JSON line. Needs root (network namespaces, mounts)."""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from incfs.mount import MountConfig, mount_background, runtime_dir, umount
from incfs.pack import pack
from incfs.testing.link import shaped_http_server
from incfs.testing.nginx import Nginx

RATE, RTT, SIZE = 100_000_000, 0.020, 64 << 20


def _image(work: Path, files: dict[str, bytes]) -> Path:
    src = work / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    www = work / "www"
    www.mkdir()
    pack(src, www / "app.img", compress="none")
    return www


def _config(work: Path, url: str, rep: int) -> MountConfig:
    mnt = work / f"mnt{rep}"
    mnt.mkdir()
    return MountConfig(source=url, mountpoint=str(mnt), cache=str(work / f"c{rep}.img"),
                       allow_unsigned=True, prefetch="none", read_timeout=120)


def _peak_rss(mnt: str) -> str:
    pid = int((runtime_dir(mnt) / "pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split(":")[1].strip() for line in status if line.startswith("VmHWM"))


def sequential(work: Path, reps: int) -> list[dict]:
    www = _image(work, {"big.bin": random.Random(1).randbytes(SIZE)})
    runs = []
    with shaped_http_server(www, RTT, RATE) as server:
        for rep in range(reps):
            config = _config(work, server.url("app.img"), rep)
            mount_background(config)
            t0 = time.perf_counter()
            with open(Path(config.mountpoint) / "big.bin", "rb") as f:
                while f.read(1 << 20):
                    pass
            dt = time.perf_counter() - t0
            runs.append({"s": round(dt, 2), "link_fraction": round(SIZE * 8 / RATE / dt, 2),
                         "peak_rss": _peak_rss(config.mountpoint)})
            umount(config.mountpoint)
    return runs


def scattered(work: Path, reps: int, threads: int = 16, pieces: int = 32) -> list[dict]:
    www = _image(work, {"big.bin": random.Random(1).randbytes(SIZE)})
    runs = []
    with shaped_http_server(www, RTT, RATE) as server:
        for rep in range(reps):
            config = _config(work, server.url("app.img"), rep)
            mount_background(config)
            todo = random.Random(rep).sample(range(SIZE >> 20), pieces)
            lock, total = threading.Lock(), [0]

            def worker() -> None:
                fd = os.open(Path(config.mountpoint) / "big.bin", os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                try:
                    while True:
                        with lock:
                            if not todo:
                                return
                            piece = todo.pop()
                        n = len(os.pread(fd, 1 << 20, piece << 20))
                        with lock:
                            total[0] += n
                finally:
                    os.close(fd)

            t0 = time.perf_counter()
            workers = [threading.Thread(target=worker) for _ in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            dt = time.perf_counter() - t0
            runs.append({"s": round(dt, 2), "link_fraction": round(total[0] * 8 / RATE / dt, 2),
                         "peak_rss": _peak_rss(config.mountpoint)})
            umount(config.mountpoint)
    return runs


def startup(work: Path, reps: int) -> list[dict]:
    www = _image(work, {f"f{i:03d}.bin": os.urandom(64 * 1024) for i in range(100)})
    runs = []
    with Nginx(www) as nginx:
        for rep in range(reps):
            config = _config(work, nginx.url("app.img"), rep)
            t0 = time.perf_counter()
            mount_background(config)
            ready = time.perf_counter() - t0
            (Path(config.mountpoint) / "f050.bin").open("rb").read(1)
            runs.append({"ready_ms": round(ready * 1000),
                         "first_byte_ms": round((time.perf_counter() - t0) * 1000)})
            umount(config.mountpoint)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["seq", "rand", "startup"])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"link-rate-{args.case}-"))
    case = {"seq": sequential, "rand": scattered, "startup": startup}[args.case]
    print(json.dumps({"case": args.case, "runs": case(work, args.reps)}))


if __name__ == "__main__":
    main()
