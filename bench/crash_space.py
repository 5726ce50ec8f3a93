#!/usr/bin/env python3
"""Crash harness for releasing blocks: kill -9 a process that evicts,
refills, moves files to plain copies, runs gc and compacts a cache, then
reopen the cache and check every data block is either present and right or
absent (never present and wrong, never unreadable).

    .venv/bin/python bench/crash_space.py [--kills 100] [--seed 1] [--dir DIR]
    (also: bench/crash.py space [...])

The cache is of a packed image (raw and compressible files), filled offline
the way the loader fills it. The worker does, at random: evict 1-8 chunks
(RELEASED GONE, fdatasync, punch), refill a file from the image (fill,
fdatasync), write a file's plain copy (tmp, fsync, rename, fsync dir) and
release it (RELEASED PLAIN, fdatasync, punch), run gc (sync, punch dead
payload), drop a plain copy, or compact the cache in place (new file,
fsync, rename). A kill -9 lands at any moment of these. Then, in
`--tear` of the rounds, a power cut is played: the worker notes the log's
end after each fdatasync (in a side file, before anything that sync allows,
such as a punch), and the cache is cut, zeroed or overwritten with garbage
from a random point past that durable end (punched holes stay punched: a
power cut cannot bring bytes back). The argument for real power cuts (each
punch follows a durable record) is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from incfs.errors import IncfsError  # noqa: E402
from incfs.image import Image  # noqa: E402
from incfs.pack import pack  # noqa: E402
from incfs.space import gc  # noqa: E402
from incfs.space.cap import CHUNK  # noqa: E402
from incfs.space.compact import compact  # noqa: E402
from incfs.space.release import drop_plain, evict, release_to_plain  # noqa: E402
from incfs.testing import caches  # noqa: E402

MiB = 1 << 20
OPS = ("evict", "refill", "plain", "gc", "drop_plain", "compact")
WEIGHTS = (30, 30, 15, 15, 4, 6)


def content(k: int, size: int) -> bytes:
    """File k's bytes: random (raw) for even k, compressible for odd k."""
    rng = random.Random(k)
    if k % 2 == 0:
        return rng.randbytes(size)
    return b"".join(b"line %08d of file %d\n" % (i, k) for i in range(size // 24 + 1))[:size]


def make_image(work: Path, files: int = 6, size: int = 3 * MiB) -> Path:
    src = work / "src"
    src.mkdir()
    for k in range(files):
        (src / f"f{k}").write_bytes(content(k, size - k * 5000))
    image = work / "app.img"
    pack(src, image, compress="lz4")
    return image


def durable_path(cache: str | Path) -> Path:
    return Path(f"{cache}.durable")


def _note_durable(cache: str, value: int) -> None:
    """The log's end as of the last fdatasync; -1: unknown (a compaction
    swaps the file), so the parent must not tear."""
    fd = os.open(durable_path(cache), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"%020d" % value, 0)
    finally:
        os.close(fd)


def _watch_syncs(img: Image, cache: str) -> None:
    real = img.appender.sync

    def sync() -> None:
        real()
        _note_durable(cache, img.appender.end)
    img.appender.sync = sync


def worker_main(cache: str, image: str, seed: int, log: str) -> int:
    rng = random.Random(seed)
    with open(log, "a", buffering=1) as out, Image.open(image) as src:
        sys.stdout.write("ready\n")  # the parent's clock starts here, not at exec
        sys.stdout.flush()
        while True:
            op = rng.choices(OPS, WEIGHTS)[0]
            if op == "compact":
                _note_durable(cache, -1)
                compact(Path(cache))
                _note_durable(cache, os.stat(cache).st_size)  # all of it fsynced
                out.write("compact\n")
                continue
            with Image.open(cache, writable=True) as img:
                img.durable = False  # as a mounted cache: fills synced now and then
                _watch_syncs(img, cache)
                _note_durable(cache, img.appender.end)  # the open cut any torn tail
                for _ in range(rng.randint(5, 40)):
                    op = rng.choices(OPS[:-1], WEIGHTS[:-1])[0]
                    _do(op, img, src, rng)
                    out.write(op + "\n")


def _do(op: str, img: Image, src: Image, rng: random.Random) -> None:
    files = [n for n in img.ns.inodes.values() if n.data is not None and n.size]
    node = rng.choice(files)
    if op == "evict":
        chunks = []
        for _ in range(rng.randint(1, 8)):
            c = rng.randrange(0, -(-node.data.count // CHUNK))
            chunks.append((node.ino, c * CHUNK, min((c + 1) * CHUNK, node.data.count)))
        evict(img, chunks)
    elif op == "refill":
        path = next(p for p, n in src.ns.walk() if n.ino == node.ino)
        caches.fill_from(src, img, path)
        if rng.random() < 0.3:
            img.appender.sync()  # (the loader's periodic sync)
    elif op == "plain" and node.ino in img.plain_inos and not img.plain.usable(node):
        drop_plain(img, node)  # as passthrough does when it finds the copy gone
    elif op == "plain" and node.complete:
        _write_plain(img, node)
        release_to_plain(img, node)
    elif op == "gc":
        gc.collect(img, unlinked=False)
    elif op == "drop_plain":
        img.plain.path(node).unlink(missing_ok=True)


def _write_plain(img: Image, node) -> None:
    path = img.plain.path(node)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    try:
        os.pwrite(fd, img.read_range(node, 0, node.size), 0)  # verified bytes
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


@dataclass
class Figures:
    rounds: int = 0
    blocks_checked: int = 0
    present: int = 0
    absent: int = 0
    plain_files_seen: int = 0
    tears: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)


def check(cache: Path, truth: dict[bytes, bytes], fig: Figures) -> None:
    """Every data block present and right, or absent."""
    with Image.open(cache) as img:
        fig.plain_files_seen += len(img.plain_inos)
        for path, node in img.ns.walk():
            if node.data is None:
                continue
            want = truth[path]
            for i in range(node.data.count):
                fig.blocks_checked += 1
                if not node.data.is_present(i):
                    fig.absent += 1
                    continue
                fig.present += 1
                try:
                    got = img.read_range(node, i * 4096, 4096)
                except IncfsError as e:
                    fig.violations.append(f"round {fig.rounds}: {path!r} block {i}: {e}")
                    continue
                if got != want[i * 4096:(i + 1) * 4096]:
                    fig.violations.append(f"round {fig.rounds}: {path!r} block {i} is wrong")


def tear(cache: Path, rng: random.Random, fig: Figures) -> None:
    """A power cut after the kill: what no fdatasync covered may be gone."""
    try:
        point = int(durable_path(cache).read_text() or -1)
    except (OSError, ValueError):
        point = -1
    size = cache.stat().st_size
    if point < 0 or point >= size:
        fig.tears["nothing_to_tear"] = fig.tears.get("nothing_to_tear", 0) + 1
        return
    mode = rng.choice(["truncate", "zeros", "garbage"])
    at = rng.randint(point, size)
    with open(cache, "r+b") as f:
        if mode == "truncate":
            f.truncate(at)
        else:
            f.seek(at)
            f.write(bytes(size - at) if mode == "zeros" else random.Random(at).randbytes(size - at))
        f.flush()
        os.fsync(f.fileno())
    fig.tears[mode] = fig.tears.get(mode, 0) + 1


def run(work: Path, kills: int, seed: int, max_run: float = 0.5,
        tear_rate: float = 0.35) -> Figures:
    image = make_image(work)
    truth = {b"/" + p.name.encode(): p.read_bytes() for p in (work / "src").iterdir()}
    cache = work / "cache.img"
    caches.filled_cache(image, cache).close()
    rng, fig, log = random.Random(seed), Figures(), work / "ops.log"
    for r in range(kills):
        fig.rounds = r + 1
        proc = subprocess.Popen([sys.executable, str(HERE), "worker", str(cache), str(image),
                                 str(rng.randrange(1 << 30)), str(log)],
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                                stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.05, max_run))
        if proc.poll() is not None:
            fig.violations.append(f"round {r + 1}: the worker failed by itself ({proc.returncode})")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if rng.random() < tear_rate:
            tear(cache, rng, fig)
        check(cache, truth, fig)
        if len(fig.violations) > 50:
            break
    for line in (log.read_text().split() if log.exists() else []):
        fig.ops[line] = fig.ops.get(line, 0) + 1
    return fig


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker_main(argv[1], argv[2], int(argv[3]), argv[4])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-run", type=float, default=0.5, help="longest run before a kill (s)")
    ap.add_argument("--tear", type=float, default=0.35, help="share of rounds that tear")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="incfs-crash-space-", dir=args.dir))
    try:
        fig = run(work, args.kills, args.seed, args.max_run, args.tear)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({**asdict(fig), "violations": fig.violations[:20]}, indent=1))
    return 1 if fig.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
