#!/usr/bin/env python3
"""Loader figures of issue 10 that bench/run.py does not take, each as a
fraction of a shaped link's rate (tbf in a network namespace + the delaying
proxy, as in bench/lazy_cases.py), with the daemon's peak RSS:

  seq      one sequential reader (`read` of 1 MiB to the end of one file)
  rand     16 threads reading random distinct 1 MiB pieces of it
  faults   seq while the proxy resets a connection every 20 MiB of traffic;
           every byte read is compared with the source (wrong bytes: 0)
  startup  until the tree is visible and the first byte, from `mount_background`
           and from the `incfs mount` command, started cold and warm (incfs.warm)

seq and rand also run `rclone mount` (http backend on the plain file, cache
modes off and full) in the same run, interleaved with incfs, and print the
ratio of incfs's time to each.

    sudo .venv/bin/python bench/link_rate.py seq|rand|faults|startup \\
        [--reps N] [--size 64M] [--link 20ms:100mbit] [--no-rclone]

Run it with PYTHONPATH pointing at the tree to measure (before/after).
Prints one JSON line. Needs root (network namespaces, mounts)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import clean_mountpoint, fuse_umount, wait_mounted, which  # noqa: E402
from lazy_cases import Link, parse_links, served  # noqa: E402

from incfs.mount import MountConfig, mount_background, runtime_dir, umount  # noqa: E402
from incfs.pack import pack  # noqa: E402
from incfs import warm  # noqa: E402

MiB = 1 << 20
RESET_EVERY = 20 * MiB  # bytes of traffic between two connection resets (issue 10)


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def _served_dir(work: Path, size: int) -> tuple[Path, bytes]:
    """www/ with app.img (incfs, raw) and tree/big.bin (the plain file rclone reads)."""
    rng = random.Random(1)  # randbytes of more than 256 MiB at once overflows
    data = b"".join(rng.randbytes(min(64 * MiB, size - k)) for k in range(0, size, 64 * MiB))
    src = work / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(data)
    www = work / "www"
    www.mkdir()
    pack(src, www / "app.img", compress="none")
    os.symlink(src, www / "tree")
    return www, data


def _peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM")))


@contextlib.contextmanager
def _incfs(work: Path, url: str, rep: int) -> Iterator[tuple[Path, Callable[[], dict]]]:
    """An incfs mount of `url`; yields (file path, facts to report)."""
    mnt = work / f"mnt-incfs-{rep}"
    mnt.mkdir()
    config = MountConfig(source=url, mountpoint=str(mnt), cache=str(work / f"c{rep}.img"),
                         allow_unsigned=True, prefetch="none", read_timeout=300)
    mount_background(config)
    pid = int((runtime_dir(str(mnt)) / "pid").read_text())

    def facts() -> dict:
        loader = json.loads((mnt / ".incfs" / "status").read_text()).get("loader", {})
        return {"peak_rss_mib": round(_peak_rss_kb(pid) / 1024, 1),
                "inflight_bytes_peak_mib": round(loader.get("inflight_bytes_peak", 0) / MiB, 1),
                "link": loader.get("link"), "retries": loader.get("retries"),
                "crc_failures": loader.get("crc_failures")}
    try:
        yield mnt / "big.bin", facts
    finally:
        umount(str(mnt))
        (work / f"c{rep}.img").unlink(missing_ok=True)


@contextlib.contextmanager
def _rclone(work: Path, base: str, rep: int, mode: str) -> Iterator[tuple[Path, Callable[[], dict]]]:
    """rclone mount of the plain tree (http backend) with --vfs-cache-mode `mode`."""
    mnt = work / f"mnt-rclone-{mode}-{rep}"
    cache = work / f"rclone-cache-{rep}"
    clean_mountpoint(str(mnt))
    proc = subprocess.Popen(
        # no --http-no-head: without a HEAD the file's size is unknown, and
        # then the full cache mode reads nothing, nor does pread() at an offset
        ["rclone", "mount", ":http:", str(mnt), "--http-url", f"{base}tree/", "--read-only",
         "--vfs-cache-mode", mode, "--cache-dir", str(cache), "--allow-other",
         "--config", "/dev/null", "--log-level", "ERROR"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        wait_mounted(str(mnt), timeout=60, proc=proc)
        yield mnt / "big.bin", lambda: {"peak_rss_mib": round(_peak_rss_kb(proc.pid) / 1024, 1)}
    finally:
        fuse_umount(str(mnt))
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", str(cache)], check=False)


def _read_all(path: Path, expect: bytes | None = None) -> tuple[int, int]:
    """Read `path` with 1 MiB reads: (bytes read, bytes that differ from `expect`)."""
    total = wrong = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            if expect is not None and chunk != expect[total:total + len(chunk)]:
                wrong += sum(a != b for a, b in zip(chunk, expect[total:total + len(chunk)]))
            total += len(chunk)
    return total, wrong


def _read_pieces(path: Path, size: int, seed: int, threads: int = 16, pieces: int = 32) -> int:
    """16 threads reading `pieces` distinct random 1 MiB pieces: bytes read."""
    todo = random.Random(seed).sample(range(size >> 20), min(pieces, size >> 20))
    lock, total = threading.Lock(), [0]

    def worker() -> None:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    piece = todo.pop()
                n = len(os.pread(fd, MiB, piece << 20))
                with lock:
                    total[0] += n
        finally:
            os.close(fd)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total[0]


def _systems(with_rclone: bool) -> list[tuple[str, str | None]]:
    systems: list[tuple[str, str | None]] = [("incfs", None)]
    if with_rclone and which("rclone"):
        systems += [("rclone-off", "off"), ("rclone-full", "full")]
    return systems


def _mount(name: str, mode, work: Path, base: str, rep: int):
    if name == "incfs":
        return _incfs(work, f"{base}app.img", rep)
    return _rclone(work, base, rep, mode)


def throughput(work: Path, reps: int, size: int, link: Link, case: str,
               with_rclone: bool) -> dict:
    """seq or rand for incfs and (interleaved, same link) rclone."""
    www, _data = _served_dir(work, size)
    runs: dict[str, list[dict]] = {}
    with served(www, link) as proxy:
        base = proxy.url("/")
        for rep in range(reps):
            for name, mode in _systems(with_rclone):
                with _mount(name, mode, work, base, rep) as (path, facts):
                    proxy.reset_counters()
                    t0 = time.perf_counter()
                    nbytes = (_read_all(path)[0] if case == "seq"
                              else _read_pieces(path, size, seed=rep))
                    dt = time.perf_counter() - t0
                    runs.setdefault(name, []).append(
                        {"s": round(dt, 2), "link_fraction": round(nbytes * 8 / link.rate_bit / dt, 3),
                         "wire_per_byte": round(proxy.bytes_down / max(1, nbytes), 3), **facts()})
    return _summary(runs)


def _summary(runs: dict[str, list[dict]]) -> dict:
    out: dict = {"runs": runs, "median_link_fraction": {}, "incfs_time_vs": {}}
    for name, rs in runs.items():
        out["median_link_fraction"][name] = statistics.median(r["link_fraction"] for r in rs)
    incfs = statistics.median(r["s"] for r in runs["incfs"])
    for name, rs in runs.items():
        if name != "incfs":
            out["incfs_time_vs"][name] = round(incfs / statistics.median(r["s"] for r in rs), 2)
    return out


def _resetter(proxy, stop: threading.Event, every: int) -> None:
    """Arm one connection reset each time another `every` bytes went down
    (a fault at offset 0 fires on the next chunk of whichever connection)."""
    mark = every
    while not stop.wait(0.005):
        if proxy.bytes_down >= mark:
            proxy.reset_after(0, count=1)
            mark += every


def faults(work: Path, reps: int, size: int, link: Link, with_rclone: bool) -> dict:
    """seq through a proxy that resets a connection every RESET_EVERY bytes."""
    www, data = _served_dir(work, size)
    runs: dict[str, list[dict]] = {}
    with served(www, link) as proxy:
        base = proxy.url("/")
        for rep in range(reps):
            with _incfs(work, f"{base}app.img", rep) as (path, facts):
                proxy.reset_counters()
                stop = threading.Event()
                thread = threading.Thread(target=_resetter, args=(proxy, stop, RESET_EVERY))
                thread.start()
                t0 = time.perf_counter()
                try:
                    nbytes, wrong = _read_all(path, expect=data)
                finally:
                    dt = time.perf_counter() - t0
                    stop.set()
                    thread.join()
                    proxy.clear_faults()
                runs.setdefault("incfs", []).append(
                    {"s": round(dt, 2), "link_fraction": round(nbytes * 8 / link.rate_bit / dt, 3),
                     "bytes_read": nbytes, "wrong_bytes": wrong, "resets": proxy.resets,
                     **facts()})
    return _summary(runs)


def startup(work: Path, reps: int, link: Link, files: int = 100) -> dict:
    """An image of `files` files (6.25 MiB in all) over the link: mount until
    the tree is visible, from Python (`mount_background`, what an embedding
    program calls) and with the command (`incfs mount URL MNT`, what a user
    types), alternated. Past ~300 files the metadata is longer than the
    first read (LoaderConfig.first_read), and comes in two requests."""
    src = work / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:05d}.bin").write_bytes(os.urandom(100 * 64 * 1024 // files))
    www = work / "www"
    www.mkdir()
    pack(src, www / "app.img", compress="none")
    # api: mount_background; command: `incfs mount` started cold (INCFS_WARM=0);
    # warm: `incfs mount` started by the warm process (incfs.warm) a first
    # command left behind
    runs: dict[str, list[dict]] = {"api": [], "command": [], "warm": []}
    with served(www, link) as proxy:
        def config_for(how: str, rep: int | str) -> MountConfig:
            mnt = work / f"mnt-{how}-{rep}"
            mnt.mkdir()
            return MountConfig(source=proxy.url("/app.img"), mountpoint=str(mnt),
                               cache=str(work / f"c-{how}-{rep}.img"),
                               allow_unsigned=True, prefetch="none")

        priming = config_for("warm", "first")
        _time_startup(priming, "warm", files)
        _wait_warm()
        for rep in range(reps):
            for how in runs:
                config = config_for(how, rep)
                runs[how].append(_time_startup(config, how, files))
                umount(config.mountpoint)
        umount(priming.mountpoint)
        warm.stop()
    if not all(r["warm_start"] for r in runs["warm"]):
        print("note: not every warm run was started warm", file=sys.stderr)
    if not all(r["early_start"] for r in runs["command"]):
        print("note: not every cold command ran in its early child (incfs.early_fork)",
              file=sys.stderr)
    summary = {how: {"visible_ms": [r["visible_ms"] for r in rs],
                     "median_visible_ms": statistics.median(r["visible_ms"] for r in rs),
                     "min_visible_ms": min(r["visible_ms"] for r in rs),
                     "median_first_byte_ms": statistics.median(r["first_byte_ms"] for r in rs),
                     "tree_ok": all(r["tree_ok"] for r in rs)}
               for how, rs in runs.items()}
    return {**summary, "target_ms": round((link.rtt_s + 0.150) * 1000)}


def _time_startup(config: MountConfig, how: str, files: int) -> dict:
    t0 = time.perf_counter()
    if how == "api":
        mount_background(config)
    else:
        subprocess.run([str(Path(sys.executable).with_name("incfs")), "mount",
                        "--allow-unsigned", "--prefetch", "none", "--cache", config.cache,
                        config.source, config.mountpoint], check=True,
                       env={**os.environ, warm.ENV: "1" if how == "warm" else "0"})
    visible = len(os.listdir(config.mountpoint)) == files
    ready = time.perf_counter() - t0
    (Path(config.mountpoint) / f"f{files // 2:05d}.bin").open("rb").read(1)
    first_byte = time.perf_counter() - t0
    with open(Path(config.mountpoint) / ".incfs" / "status") as f:  # noqa: PTH123
        status = json.load(f)
    return {"visible_ms": round(ready * 1000), "tree_ok": visible,
            "first_byte_ms": round(first_byte * 1000),
            "warm_start": status.get("warm_start", False),
            "early_start": status.get("early_start", False)}


def _wait_warm(timeout: float = 30.0) -> None:
    """Until the warm process the first command left behind answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if warm.answers():
            return
        time.sleep(0.05)
    print("note: no warm process answered", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["seq", "rand", "faults", "startup"])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--size", type=parse_size, default=64 * MiB, help="file size, e.g. 1G")
    parser.add_argument("--link", default="20ms:100mbit", help="RTT:RATE, e.g. 100ms:10mbit")
    parser.add_argument("--no-rclone", action="store_true", help="incfs only")
    parser.add_argument("--files", type=int, default=100, help="startup: files in the image")
    args = parser.parse_args()
    link = parse_links(args.link, parse_size)[0]
    work = Path(tempfile.mkdtemp(prefix=f"link-rate-{args.case}-"))
    if args.case == "startup":
        result = startup(work, args.reps, link, args.files)
    elif args.case == "faults":
        result = faults(work, args.reps, args.size, link, not args.no_rclone)
    else:
        result = throughput(work, args.reps, args.size, link, args.case, not args.no_rclone)
    print(json.dumps({"case": args.case, "link": link.name, "size": args.size, **result}))
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
