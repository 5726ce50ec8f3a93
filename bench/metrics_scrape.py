#!/usr/bin/env python3
"""Issue 13's check: 10,000 scrapes of /metrics during a lazy read change
neither the read's throughput (beyond noise) nor the daemon's memory.

One image of FILES random files is served over loopback HTTP by
`incfs serve` (its own process) and mounted lazily (built-in loader,
prefetch none, --metrics-listen). Files are read whole, one after another,
each for the first time (so every block is fetched): every
(K+1)-th file with nobody scraping, the K others while a thread scrapes
/metrics back to back (--with-per-without K, default 1: alternate).
Interleaving puts the same drift (page cache, cache file growth, the
machine's other load) on both sides; a permutation test says whether the
difference of the medians is beyond noise. When the reads are over and
fewer than SCRAPES scrapes were made, scraping goes on alone up to
SCRAPES, then EXTRA more: the daemon's RSS is sampled before the first
scrape, after the reads, after SCRAPES and after the EXTRA ones (a leak
keeps growing; a warm-up does not), with its open descriptors.

    sudo PYTHONPATH=src python bench/metrics_scrape.py [--files 12] [--size-mib 48]
        [--with-per-without K] [--rate N]

Prints a JSON summary (throughput ratio = with scrapes / without).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import MiB, PYTHON, evict_file, fuse_umount, read_whole
from systems import daemon_memory

SCRAPES = 10_000
EXTRA = 2_000
SERVE = "import sys; from incfs.serve import run_server; run_server(sys.argv[1], int(sys.argv[2]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(work: Path, files: int, size: int) -> Path:
    tree = work / "tree"
    tree.mkdir()
    for i in range(files):
        with open(tree / f"f{i:03d}.bin", "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
    image = work / "image.incfs"
    subprocess.run([PYTHON, "-c", "from incfs.cli import main; main()", "pack", str(tree),
                    str(image), "--compress", "none"], check=True, stdout=subprocess.DEVNULL)
    return image


class Scraper(threading.Thread):
    """Scrapes /metrics over a new connection each time while `on` is set."""

    def __init__(self, port: int, rate: float | None = None):
        super().__init__(daemon=True)
        self.port = port
        self.pause = 1.0 / rate if rate else 0.0  # seconds between scrapes (0: back to back)
        self.on = threading.Event()
        self.stop = False
        self.count = 0
        self.failures = 0
        self.request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def scrape_once(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(self.request)
            head = b""
            while chunk := s.recv(65536):
                head = head or chunk[:12]
        if not head.startswith(b"HTTP/1.1 200"):
            self.failures += 1
        self.count += 1

    def run(self) -> None:
        while not self.stop:
            if not self.on.wait(0.1):
                continue
            self.scrape_once()
            if self.pause:
                time.sleep(self.pause)

    def scrape_until(self, total: int) -> None:
        """Scrape in this thread (the reads are over) until `total` scrapes."""
        while self.count < total:
            self.scrape_once()


def p_value(plain: list[float], scraped: list[float], shuffles: int = 10_000) -> float:
    """One-sided permutation test: how often a random split of all the
    reads shows a median ratio as low as the one measured (small: the
    scrapes slowed the reads; large: the difference is noise)."""
    observed = statistics.median(scraped) / statistics.median(plain)
    pool, n, rng, low = plain + scraped, len(plain), random.Random(13), 0
    for _ in range(shuffles):
        rng.shuffle(pool)
        low += statistics.median(pool[n:]) / statistics.median(pool[:n]) <= observed
    return low / shuffles


def daemon_pid(mnt: Path) -> int:
    from incfs.mount import runtime_dir
    return int((runtime_dir(str(mnt)) / "pid").read_text())


def snapshot(pid: int) -> dict:
    mem = daemon_memory(pid)
    return {"rss_mib": round(mem.get("VmRSS", 0) / MiB, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def timed_read(path: Path) -> float:
    started = time.perf_counter()
    n = read_whole(path)
    elapsed = time.perf_counter() - started
    evict_file(path)  # the next pass of the bench never reads it again anyway
    return n / MiB / elapsed


def run(args) -> dict:
    from incfs.mount import MountConfig, mount_background, umount
    with tempfile.TemporaryDirectory(prefix="incfs-scrape-", dir=args.work) as tmp:
        work = Path(tmp)
        image = make_image(work, args.files, args.size_mib * MiB)
        port, mport = free_port(), free_port()
        server = subprocess.Popen([PYTHON, "-c", SERVE, str(image), str(port)],
                                  stdout=subprocess.PIPE, text=True)
        url = server.stdout.readline().strip()
        mnt = work / "mnt"
        mnt.mkdir()
        mount_background(MountConfig(source=url, mountpoint=str(mnt), cache=str(work / "cache.img"),
                                     allow_unsigned=True, prefetch="none",
                                     metrics_listen=f"127.0.0.1:{mport}"))
        scraper = Scraper(mport, args.rate)
        scraper.start()
        try:
            pid = daemon_pid(mnt)
            plain, scraped = [], []
            warm = timed_read(mnt / "f000.bin")  # warm-up: first fetches, thread pools
            before = snapshot(pid)
            for i in range(1, args.files):
                with_scrapes = i % (args.with_per_without + 1) != 0
                (scraper.on.set if with_scrapes else scraper.on.clear)()
                rate = timed_read(mnt / f"f{i:03d}.bin")
                (scraped if with_scrapes else plain).append(rate)
                scraper.on.clear()
            during_reads = scraper.count
            after_reads = snapshot(pid)
            scraper.scrape_until(SCRAPES)
            after = snapshot(pid)
            scraper.scrape_until(SCRAPES + EXTRA)
            after_extra = snapshot(pid)
            status = json.loads((mnt / ".incfs" / "status").read_text())
        finally:
            scraper.stop = True
            scraper.on.clear()
            try:
                umount(str(mnt), timeout=30)
            except OSError:
                fuse_umount(str(mnt))
            server.terminate()
            server.wait(timeout=30)
    return {
        "files": args.files, "rate": args.rate or "back to back", "file_mib": args.size_mib, "warm_up_mib_s": round(warm, 1),
        "mib_s_without": [round(r, 1) for r in plain], "mib_s_with": [round(r, 1) for r in scraped],
        "median_without": round(statistics.median(plain), 1),
        "median_with": round(statistics.median(scraped), 1),
        "ratio": round(statistics.median(scraped) / statistics.median(plain), 3),
        "p_value": round(p_value(plain, scraped), 3),
        "scrapes_during_reads": during_reads, "scrapes_total": scraper.count,
        "scrape_failures": scraper.failures,
        "daemon_before_scrapes": before, "daemon_after_reads": after_reads,
        f"daemon_after_{SCRAPES}": after,
        f"daemon_after_{SCRAPES + EXTRA}": after_extra,
        "bytes_fetched": status.get("bytes_fetched"), "blocks_written": status.get("blocks_written"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12, help="files in the image (>= 3)")
    parser.add_argument("--size-mib", type=int, default=48, help="MiB per file")
    parser.add_argument("--with-per-without", type=int, default=1,
                        help="files read with scrapes for each one read without")
    parser.add_argument("--rate", type=float, default=None,
                        help="scrapes per second during the reads (default: back to back)")
    parser.add_argument("--work", default=None, help="directory for the image and cache")
    args = parser.parse_args()
    if args.files < 3:
        sys.exit("--files must be at least 3")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
