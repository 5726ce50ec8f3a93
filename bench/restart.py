#!/usr/bin/env python3
"""Never drop a program: kill -9 the daemon again and again under load.

    python bench/restart.py [--kills 100] [--upgrades 10]

An empty mount with a backing image holds 8 complete files, which 8 threads
read end to end over and over, and 4 sparse files, whose blocks 4 other
threads read one at a time while they are still absent (a loader thread here
fills each pending read after a short delay, reconnecting whenever the daemon
it talks to is gone). Meanwhile the daemon is killed with SIGKILL `--kills`
times, then replaced `--upgrades` times with `incfs restart`. It reports every
program error and wrong byte (the promise: none) and the time from each kill
until a new daemon answers (p50/p99; the target: within 1 s).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from incfs import BLOCK_SIZE, ROOT_INO  # noqa: E402
from incfs.control import Client  # noqa: E402
from incfs.mount import MountConfig, mount_background, umount  # noqa: E402
from incfs.rundir import runtime_dir  # noqa: E402

MiB = 1 << 20
STREAM_FILES, WAIT_FILES = 8, 4
STREAM_SIZE = 4 * MiB
SPARSE_BLOCKS = 1 << 16
FILL_DELAY = 0.05  # seconds a pending read waits before the loader fills it


def block_of(ino: int, index: int) -> bytes:
    return random.Random(ino * 1_000_003 + index).randbytes(BLOCK_SIZE)


class Load:
    def __init__(self, mnt: Path):
        self.mnt = mnt
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self.waited = 0
        self.expected: dict[str, bytes] = {}
        self.sparse: dict[str, int] = {}

    def control(self) -> Client:
        return Client.connect_socket(str(runtime_dir(str(self.mnt)) / "control.sock"), 10)

    def setup(self) -> None:
        with self.control() as c:
            for i in range(STREAM_FILES):
                data = os.urandom(STREAM_SIZE)
                ino = c.create_file(ROOT_INO, f"s{i}", size=len(data))
                c.fill_blocks(ino, [(k, data[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE])
                                    for k in range(len(data) // BLOCK_SIZE)])
                self.expected[f"s{i}"] = data
            for i in range(WAIT_FILES):
                self.sparse[f"w{i}"] = c.create_file(ROOT_INO, f"w{i}",
                                                     size=SPARSE_BLOCKS * BLOCK_SIZE)

    def stream(self, name: str) -> None:
        while not self.stop.is_set():
            try:
                with open(self.mnt / name, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    if f.read() != self.expected[name]:
                        self.errors.append(f"{name}: wrong bytes")
                self.reads += 1
            except OSError as e:
                self.errors.append(f"{name}: {e}")

    def wait_absent(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        ino = self.sparse[name]
        while not self.stop.is_set():
            index = rng.randrange(SPARSE_BLOCKS)
            try:
                fd = os.open(self.mnt / name, os.O_RDONLY)
                try:
                    got = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
                finally:
                    os.close(fd)
                if got != block_of(ino, index):
                    self.errors.append(f"{name} block {index}: wrong bytes")
                self.waited += 1
            except OSError as e:
                self.errors.append(f"{name} block {index}: {e}")

    def loader(self) -> None:
        while not self.stop.is_set():
            try:
                with self.control() as c:
                    while not self.stop.is_set():
                        for pr in c.pending_reads(timeout=0.2):
                            time.sleep(FILL_DELAY)
                            c.fill_blocks(pr.ino, [(pr.block, block_of(pr.ino, pr.block))])
            except (OSError, ValueError):
                time.sleep(0.02)  # the daemon died: connect to the next one


def serving_pid(mnt: Path) -> int | None:
    try:
        with Client.connect_socket(str(runtime_dir(str(mnt)) / "control.sock"), 2) as c:
            return int(c.status()["pid"])
    except (OSError, ValueError, KeyError):
        return None


def wait_new(mnt: Path, old: int, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pid = serving_pid(mnt)
        if pid is not None and pid != old:
            return time.monotonic() - started
        time.sleep(0.005)
    raise RuntimeError(f"no new daemon after {timeout} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--upgrades", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.3, help="seconds between faults")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="incfs-restart-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        mount_background(MountConfig(source="empty", mountpoint=str(mnt),
                                     cache=str(Path(tmp) / "cache.img")))
        load = Load(mnt)
        threads: list[threading.Thread] = []
        try:
            load.setup()
            threads = ([threading.Thread(target=load.stream, args=(n,)) for n in load.expected]
                       + [threading.Thread(target=load.wait_absent, args=(n, i))
                          for i, n in enumerate(load.sparse)]
                       + [threading.Thread(target=load.loader)])
            for t in threads:
                t.start()
            kill_times, upgrade_times = [], []
            for _ in range(args.kills):
                time.sleep(args.interval)
                old = serving_pid(mnt)
                os.kill(old, signal.SIGKILL)
                kill_times.append(wait_new(mnt, old))
            for _ in range(args.upgrades):
                time.sleep(args.interval)
                old = serving_pid(mnt)
                started = time.monotonic()
                subprocess.run([sys.executable, "-m", "incfs.cli", "restart", str(mnt)],
                               check=True, capture_output=True)
                upgrade_times.append(time.monotonic() - started)
            time.sleep(1.0)
        finally:
            load.stop.set()
            for t in threads:
                t.join(60)
            umount(str(mnt))
    print(f"kill -9 of the daemon: {len(kill_times)} times; incfs restart: "
          f"{len(upgrade_times)} times")
    print(f"whole-file reads checked: {load.reads}; reads of absent blocks that waited "
          f"and were checked: {load.waited}")
    print(f"program errors and wrong bytes: {len(load.errors)}")
    for e in load.errors[:10]:
        print(f"  {e}")
    if kill_times:
        print(f"service back after kill -9: p50 {percentile(kill_times, 0.5) * 1000:.0f} ms, "
              f"p99 {percentile(kill_times, 0.99) * 1000:.0f} ms, "
              f"max {max(kill_times) * 1000:.0f} ms (mean {statistics.mean(kill_times) * 1000:.0f})")
    if upgrade_times:
        print(f"incfs restart, command to new daemon serving: p50 "
              f"{percentile(upgrade_times, 0.5) * 1000:.0f} ms, "
              f"max {max(upgrade_times) * 1000:.0f} ms")
    return 1 if load.errors else 0


if __name__ == "__main__":
    sys.exit(main())
