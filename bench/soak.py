#!/usr/bin/env python3
"""Soak: a mount from nginx behind a fault-injecting proxy for a long time,
with readers checking every byte, while the daemon's memory and open file
descriptors are sampled. Prints whether they stay flat.

    .venv/bin/python bench/soak.py [--minutes 30] [--size-mib 256] [--rate-kib 400]
                                   [--sample 5] [--seed 1] [--json OUT] [--dir DIR]

The image (random, compressible and zero blocks, zstd, signed) is served by
nginx through incfs.testing.faultproxy.FaultProxy at a capped rate, and
mounted with a cache and a key, waiting forever on a miss (the default: a
blip must not fail reads). Every 3-15 s one fault starts: connection resets
and clean truncations mid-body, a corrupted byte, a stall of up to 10 s, a
503 period of up to 20 s (the proxy is pointed at a server that answers
every request 503, and open connections are reset), refused connections, or
a new round-trip time. Four reader threads read random ranges and compare
them with the source (dropping the page cache now and then so reads reach
the daemon). When the cache is complete the mount is taken down, the cache
deleted and the next cycle mounts again, so the network is busy all along.

Every `--sample` seconds: the daemon's RSS (VmRSS) and its open fds
(/proc/PID/fd). At the end, per cycle: RSS and fds of the first and last
fifth of the samples (after a warm-up); "flat" means RSS grew less than
10% + 8 MiB and fds by at most 8. Then the cache is checked offline: every
present block must equal the source. Exit status 0 when nothing wrong was
read, nothing wrong is in the cache and everything stayed flat.
"""

from __future__ import annotations

import argparse
import errno
import http.server
import json
import os
import random
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from incfs import BLOCK_SIZE  # noqa: E402

MiB = 1 << 20


# --- the source ---------------------------------------------------------------------

def build_tree(root: Path, size: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    files: dict[str, bytes] = {}
    remaining, n = size, 0
    while remaining > 0:
        want = min(remaining, rng.choice([64 * 1024, MiB, 4 * MiB, 16 * MiB]))
        parts, got = [], 0
        while got < want:
            kind = rng.randrange(3)
            chunk = min(want - got, rng.choice([BLOCK_SIZE, 64 * 1024, 256 * 1024]))
            if kind == 0:
                parts.append(rng.randbytes(chunk))
            elif kind == 1:
                parts.append(bytes(chunk))
            else:
                parts.append((b"soak %d text block " % n * (chunk // 16 + 1))[:chunk])
            got += chunk
        name = f"d{n % 4}/file{n:03d}.bin"
        (root / name).parent.mkdir(exist_ok=True)
        data = b"".join(parts)
        (root / name).write_bytes(data)
        files[name] = data
        remaining -= want
        n += 1
    return files


class Busy503:
    """A tiny HTTP server that answers every request 503, for 503 periods."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _busy(self):
                body = b"busy\n"
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _busy

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.address = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- faults ---------------------------------------------------------------------------

class Faults(threading.Thread):
    def __init__(self, proxy, upstream, busy: Busy503, rng: random.Random, base_rtt: float):
        super().__init__(daemon=True, name="faults")
        self.proxy, self.upstream, self.busy, self.rng = proxy, upstream, busy, rng
        self.base_rtt = base_rtt
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.rng.uniform(3, 15)):
            kind = self.rng.choice(["reset", "truncate", "corrupt", "stall", "503", "refuse",
                                    "rtt", "reset", "truncate", "corrupt"])
            self.counts[kind] = self.counts.get(kind, 0) + 1
            p = self.proxy
            if kind == "reset":
                p.reset_after(self.rng.randrange(1, 600_000), count=self.rng.randint(1, 3))
            elif kind == "truncate":
                p.truncate_after(self.rng.randrange(1, 600_000), count=self.rng.randint(1, 3))
            elif kind == "corrupt":
                p.corrupt_at(self.rng.randrange(200, 600_000), count=1)
            elif kind == "stall":
                p.stall()
                self.stop.wait(self.rng.uniform(0.5, 10))
                p.unstall()
            elif kind == "503":
                p.upstream = self.busy.address
                p.reset_after(0, count=max(1, p.active_connections))
                self.stop.wait(self.rng.uniform(2, 20))
                p.upstream = self.upstream
                p.clear_faults()
            elif kind == "refuse":
                p.refuse = True
                self.stop.wait(self.rng.uniform(1, 8))
                p.refuse = False
            else:
                p.set_rtt(self.rng.choice([0.0, 0.002, 0.02, 0.1]))
        self.proxy.upstream = self.upstream
        self.proxy.refuse = False
        self.proxy.clear_faults()
        self.proxy.set_rtt(self.base_rtt)


# --- readers ---------------------------------------------------------------------------

class Readers:
    def __init__(self, mountpoint: Path, files: dict[str, bytes], rng_seed: int, n: int = 4):
        self.mountpoint, self.files = mountpoint, files
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.active = 0
        self.reads = self.bytes = self.eio = self.other_errors = 0
        self.wrong: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(rng_seed + i,), daemon=True)
                        for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()

    def close(self):
        self.stop.set()
        self.running.set()
        for t in self.threads:
            t.join(timeout=60)

    def pause(self, timeout: float = 120.0) -> None:
        """Stop opening files and wait for the reads in flight (to unmount)."""
        self.running.clear()
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.05)

    def resume(self) -> None:
        self.running.set()

    def _run(self, seed: int):
        rng = random.Random(seed)
        names = sorted(self.files)
        while not self.stop.is_set():
            self.running.wait()
            with self.lock:
                self.active += 1
            try:
                self._one(rng, names)
            finally:
                with self.lock:
                    self.active -= 1

    def _one(self, rng: random.Random, names: list[str]) -> None:
        name = rng.choice(names)
        want = self.files[name]
        if not want or not self.running.is_set():
            return
        offset = rng.randrange(len(want))
        length = rng.choice([1, 4096, 65536, 300_000])
        try:
            fd = os.open(self.mountpoint / name, os.O_RDONLY)
        except OSError:
            time.sleep(0.2)  # between cycles
            return
        try:
            if rng.random() < 0.2:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            got = os.pread(fd, length, offset)
        except OSError as e:
            with self.lock:
                if e.errno == errno.EIO:
                    self.eio += 1
                else:
                    self.other_errors += 1
            time.sleep(0.1)
            return
        finally:
            os.close(fd)
        with self.lock:
            if got != want[offset:offset + length]:
                self.wrong.append(f"{name} @{offset}+{length}")
            self.reads += 1
            self.bytes += len(got)


# --- sampling --------------------------------------------------------------------------

def daemon_pid(mountpoint: Path) -> int:
    from incfs.mount import runtime_dir
    return int((runtime_dir(str(mountpoint)) / "pid").read_text())


def sample(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def flatness(samples: list[tuple[float, int, int]], warmup: float) -> dict:
    """Compare the first and the last fifth of the samples after warm-up."""
    t0 = samples[0][0] if samples else 0
    kept = [s for s in samples if s[0] - t0 >= warmup] or samples
    if len(kept) < 5:
        return {"samples": len(kept), "flat": None}
    k = max(1, len(kept) // 5)
    head, tail = kept[:k], kept[-k:]
    rss0, rss1 = statistics.median(s[1] for s in head), statistics.median(s[1] for s in tail)
    fd0, fd1 = statistics.median(s[2] for s in head), statistics.median(s[2] for s in tail)
    rss_flat = rss1 - rss0 < 0.10 * rss0 + 8 * MiB
    fds_flat = fd1 - fd0 <= 8
    return {"samples": len(kept), "rss_start_mib": round(rss0 / MiB, 1),
            "rss_end_mib": round(rss1 / MiB, 1),
            "rss_max_mib": round(max(s[1] for s in samples) / MiB, 1),
            "fds_start": fd0, "fds_end": fd1, "fds_max": max(s[2] for s in samples),
            "rss_flat": rss_flat, "fds_flat": fds_flat, "flat": rss_flat and fds_flat}


# --- the run ----------------------------------------------------------------------------

def mount_with_retries(config, log) -> None:
    from incfs.errors import IncfsError
    from incfs.mount import mount_background
    for attempt in range(20):
        try:
            mount_background(config)
            return
        except IncfsError as e:  # the metadata fetch met a fault: try again
            log(f"mount attempt {attempt + 1} failed: {e}")
            time.sleep(2)
    raise RuntimeError("could not mount in 20 attempts")


def unmount(mnt: Path) -> None:
    """Unmount and wait for the daemon; lazily if something still holds it."""
    from incfs.mount import umount
    for _ in range(20):
        if not os.path.ismount(mnt):
            return
        try:
            umount(str(mnt))
            return
        except OSError:
            time.sleep(0.5)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def check_cache(cache: Path, files: dict[str, bytes]) -> dict:
    from incfs.errors import IncfsError
    from incfs.image import Image, MissingBlock
    out = {"blocks_checked": 0, "wrong": 0, "unreadable": 0}
    with Image.open(cache) as img:
        for path, node in img.ns.walk():
            if node.data is None:
                continue
            data = files[path.decode().lstrip("/")]
            for i, *_r in list(node.data.entries()):
                try:
                    got = img.read_block(node, i)
                except MissingBlock:
                    continue
                except IncfsError:
                    out["unreadable"] += 1
                    continue
                out["blocks_checked"] += 1
                out["wrong"] += got != data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
    return out


def run(args) -> dict:
    from incfs.control import Client
    from incfs.integrity import signing
    from incfs.mount import MountConfig
    from incfs.pack import pack
    from incfs.testing.faultproxy import FaultProxy
    from incfs.testing.nginx import Nginx

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="incfs-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    log(f"building a {args.size_mib} MiB tree in {work}")
    files = build_tree(work / "src", args.size_mib * MiB, args.seed)
    priv, pub = signing.write_keypair(work / "key", signing.ALGORITHM_NAMES["ed25519"])
    (work / "www").mkdir(exist_ok=True)
    pack(work / "src", work / "www" / "app.img", compress="zstd", sign_key=priv)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    cache = work / "cache.img"
    result: dict = {"minutes": args.minutes, "size_mib": args.size_mib, "cycles": [],
                    "rate_kib": args.rate_kib}
    busy = Busy503()
    with Nginx(work / "www") as nginx:
        upstream = nginx.address
        with FaultProxy(upstream, rate_down=args.rate_kib * 1024) as proxy:
            proxy.set_rtt(0.01)
            faults = Faults(proxy, upstream, busy, rng, 0.01)
            readers = Readers(mnt, files, args.seed * 31)
            config = MountConfig(source=proxy.url("app.img"), mountpoint=str(mnt),
                                 cache=str(cache), key=str(pub), read_timeout=None,
                                 prefetch="sequential")
            deadline = time.monotonic() + args.minutes * 60
            faults.start()
            started_readers = False
            try:
                while time.monotonic() < deadline:
                    cache.unlink(missing_ok=True)
                    mount_with_retries(config, log)
                    pid = daemon_pid(mnt)
                    if not started_readers:
                        readers.start()
                        started_readers = True
                    readers.resume()
                    cycle = {"pid": pid, "started": round(time.monotonic(), 1), "samples": []}
                    log(f"cycle {len(result['cycles']) + 1}: daemon {pid}")
                    client = Client.connect(mnt, timeout=60)
                    try:
                        while time.monotonic() < deadline:
                            time.sleep(args.sample)
                            s = sample(pid)
                            if s is None:
                                raise RuntimeError(f"daemon {pid} is gone")
                            cycle["samples"].append((time.monotonic(), *s))
                            st = client.status()
                            if len(cycle["samples"]) % 12 == 0:
                                log(f"  rss {s[0] / MiB:.1f} MiB, fds {s[1]}, blocks "
                                    f"{st['blocks_present']}/{st['blocks_total']}, reads "
                                    f"{readers.reads}, wrong {len(readers.wrong)}, eio "
                                    f"{readers.eio}, faults {sum(faults.counts.values())}")
                            if st.get("complete"):
                                break
                        cycle["status"] = {k: client.status().get(k) for k in (
                            "blocks_present", "blocks_total", "bytes_fetched", "verify_failures",
                            "read_errors", "timeouts", "source_errors", "complete")}
                    finally:
                        client.close()
                    readers.pause()
                    unmount(mnt)
                    cycle["flatness"] = flatness(cycle["samples"], args.warmup)
                    cycle["cache_check"] = check_cache(cache, files)
                    cycle["seconds"] = round(time.monotonic() - cycle.pop("started"), 1)
                    cycle["samples"] = len(cycle["samples"])
                    log(f"cycle done: {json.dumps(cycle)}")
                    result["cycles"].append(cycle)
            finally:
                faults.stop.set()
                faults.join(timeout=30)
                readers.close()
                unmount(mnt)
            result["proxy"] = {k: getattr(proxy, k) for k in (
                "bytes_down", "connections", "refused", "resets", "truncations", "corruptions")}
    busy.close()
    result["faults"] = faults.counts
    result["reads"] = {"reads": readers.reads, "bytes": readers.bytes, "eio": readers.eio,
                       "other_errors": readers.other_errors, "wrong": len(readers.wrong),
                       "wrong_examples": readers.wrong[:5]}
    cycles = result["cycles"]
    result["data_lost_or_wrong"] = len(readers.wrong) + sum(
        c["cache_check"]["wrong"] for c in cycles)
    full = [c for c in cycles if c["flatness"].get("flat") is not None]
    result["flat"] = all(c["flatness"]["flat"] for c in full) if full else None
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--size-mib", type=int, default=256, help="image content size")
    ap.add_argument("--rate-kib", type=int, default=400, help="proxy bandwidth, KiB/s")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds ignored for flatness")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still unmount on SIGTERM
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    for i, c in enumerate(result["cycles"], 1):
        f = c["flatness"]
        print(f"cycle {i}: {c['seconds']} s, RSS {f.get('rss_start_mib')} -> "
              f"{f.get('rss_end_mib')} MiB (max {f.get('rss_max_mib')}), fds {f.get('fds_start')} "
              f"-> {f.get('fds_end')}: {'flat' if f.get('flat') else 'NOT flat' if f.get('flat') is False else 'too short to judge'}")
    print(f"data lost or wrong: {result['data_lost_or_wrong']}; flat: {result['flat']}")
    ok = result["data_lost_or_wrong"] == 0 and result["flat"] is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
