#!/usr/bin/env python3
"""Disk space of a mount's cache (issue 13 item 1, issue 9 item 3).

    python bench/space.py cap  [--size-mib 256] [--cap 32M] [--passes 2]
    python bench/space.py once [--size-mib 256]

`cap`: a 256 MiB raw image read end to end twice through a mount with
`--cache-size 32M` (a local source: no network shaping); the cache file's
allocated size (st_blocks * 512) is sampled every 5 ms throughout. Reports
the peak (the check: <= 35 MiB), whether every byte read was right, and the
refetch count from status.

`once`: the same image read fully through a mount with passthrough (root,
FUSE passthrough): once complete, every file is expanded to its plain copy
and the cache releases its own copy. Reports `du` of cache + plain
directory against file data + hash trees + metadata (the target: <= 1.05).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from incfs.image import Image  # noqa: E402
from incfs.mount import MountConfig, mount_background, umount  # noqa: E402
from incfs.pack import pack  # noqa: E402
from incfs.space.sizes import parse_size  # noqa: E402

MiB = 1 << 20
CHUNK = 1 * MiB


def make_image(work: Path, size: int) -> tuple[Path, list[bytes]]:
    """A raw (uncompressed) image of one file of random bytes; returns it
    and the SHA-256 of each 1 MiB piece, to check reads without a copy."""
    src = work / "src"
    src.mkdir()
    rng = random.Random(256)
    digests = []
    with open(src / "big", "wb") as f:
        for _ in range(size // CHUNK):
            piece = rng.randbytes(CHUNK)
            digests.append(hashlib.sha256(piece).digest())
            f.write(piece)
    image = work / "app.img"
    pack(src, image, compress="none")
    return image, digests


def read_through(path: Path, digests: list[bytes]) -> int:
    """Read the file end to end; returns the number of wrong 1 MiB pieces."""
    wrong = 0
    with open(path, "rb", buffering=0) as f:
        for want in digests:
            if hashlib.sha256(f.read(CHUNK)).digest() != want:
                wrong += 1
    return wrong


class Sampler(threading.Thread):
    def __init__(self, path: Path, every: float = 0.005):
        super().__init__(daemon=True)
        self.path, self.every = path, every
        self.peak, self.samples, self.done = 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, os.stat(self.path).st_blocks * 512)
                self.samples += 1
            except FileNotFoundError:
                pass
            time.sleep(self.every)


def status(mnt: Path) -> dict:
    return json.loads((mnt / ".incfs" / "status").read_text())


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_cap(work: Path, size: int, cap: int, passes: int, made=None) -> dict:
    """`made`: (image, digests) of an earlier run, to mount its cache again."""
    image, digests = made or make_image(work, size)
    mnt, cache = work / "mnt", work / "cache.img"
    mnt.mkdir(exist_ok=True)
    config = MountConfig(source=str(image), mountpoint=str(mnt), cache=str(cache),
                         allow_unsigned=True, read_timeout=120, prefetch="none",
                         cache_size=cap)
    mount_background(config)
    sampler = Sampler(cache)
    sampler.start()
    wrong, started = 0, time.monotonic()
    try:
        for _ in range(passes):
            drop_caches()  # the second pass must come from the cache or the source
            wrong += read_through(mnt / "big", digests)
        s = status(mnt)
    finally:
        umount(str(mnt), timeout=60)
        sampler.done.set()
        sampler.join()
    space = s.get("space", {})
    return {"image_mib": size / MiB, "cap_mib": cap / MiB, "passes": passes,
            "seconds": round(time.monotonic() - started, 2),
            "peak_allocated_mib": round(sampler.peak / MiB, 2), "samples": sampler.samples,
            "wrong_pieces": wrong, "blocks_refetched": space.get("blocks_refetched"),
            "blocks_released": space.get("blocks_released"),
            "over_cap": space.get("over_cap"), "bytes_fetched": s["bytes_fetched"]}


def du(*paths: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", *map(str, paths)], capture_output=True, text=True)
    return sum(int(line.split()[0]) for line in out.stdout.splitlines())


def run_once(work: Path, size: int) -> dict:
    image, digests = make_image(work, size)
    mnt, cache = work / "mnt", work / "cache.img"
    mnt.mkdir()
    config = MountConfig(source=str(image), mountpoint=str(mnt), cache=str(cache),
                         allow_unsigned=True, read_timeout=120, prefetch="none")
    mount_background(config)
    try:
        wrong = read_through(mnt / "big", digests)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # expansion and release run in the background
            pt = status(mnt)["fuse"].get("passthrough", {})
            if pt.get("bytes_released"):
                break
            time.sleep(0.1)
        s = status(mnt)
        wrong += read_through(mnt / "big", digests)  # a second pass: passthrough
    finally:
        umount(str(mnt), timeout=60)
    with Image.open(cache) as img:
        data = sum(n.size for n in img.ns.inodes.values() if n.data is not None)
        trees = 4096 * sum(n.hashes.count for n in img.ns.inodes.values() if n.hashes)
        meta = img.superblock.meta_end
    plain = cache.with_name(cache.name + ".plain")
    total = du(cache, plain)
    need = data + trees + meta
    return {"image_mib": size / MiB, "wrong_pieces": wrong,
            "passthrough": s["fuse"].get("passthrough", {}),
            "du_cache": du(cache), "du_plain": du(plain), "du_total": total,
            "data": data, "trees": trees, "metadata": meta,
            "ratio": round(total / need, 4), "image_du": du(image)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cap", "once"])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--cap", default="32M")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="incfs-space-") as tmp:
        work = Path(tmp)
        if args.what == "cap":
            result = run_cap(work, args.size_mib * MiB, parse_size(args.cap), args.passes)
            ok = result["wrong_pieces"] == 0 and result["peak_allocated_mib"] <= \
                parse_size(args.cap) * 1.1 / MiB
        else:
            result = run_once(work, args.size_mib * MiB)
            ok = result["wrong_pieces"] == 0 and result["ratio"] <= 1.05
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
