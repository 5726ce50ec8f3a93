"""Lazy cases: a program runs against an image served by nginx over an
emulated link (tbf bandwidth in a network namespace + a delaying proxy for
the round-trip time), against "download the whole image, then run".

Approaches (each from empty caches, each repetition from scratch):
  download     curl the whole incfs image, then mount it locally and run
               (the reference: time = download + run, the same run's download)
  incfs        incfs mounted from the URL (built-in loader, prefetch none)
  incfs-command  the same with the `incfs mount` command, the warm process on
               (incfs.warm: after a run's first mount, started warm)
  incfs-cold   the `incfs mount` command with the warm process off
               (INCFS_WARM=0): every mount starts cold, as a first one does
  incfs-prefetch  the same with incfs's default, --prefetch sequential (the
               whole image is fetched in the background, in source order,
               while reads jump the queue: more bytes on the wire when a
               program reads little)
  rclone       rclone mount of the plain tree over http (nginx autoindex),
               --vfs-cache-mode off, its default 16 MiB read buffer
  rclone-full  the same with --vfs-cache-mode full (a persistent cache, as incfs)
  httpfs2      httpfs2 mounts the squashfs image of the tree as one lazy file,
               squashfuse mounts that: a lazily fetched read-only tree
Cases: time to first byte (mount, then read one byte of one file), a program
reading 1%, 10%, 100% of the files whole, and `ls -R` of a 10,000-file image.
The clock starts before the mount command and stops when the program exits.
Bytes on the wire are counted at the proxy (HTTP headers included).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from benchlib import (PYTHON, MiB, Samples, Unavailable, clean_mountpoint, fuse_umount,
                      median, run, wait_mounted, which)
from trees import LazyTree

FRACTIONS = [1, 10, 100]


@dataclass(frozen=True)
class Link:
    rtt_s: float
    rate_bit: int
    size: int | None = None  # lazy image size on this link (None: the run's default)

    @property
    def name(self) -> str:
        rate = (f"{self.rate_bit // 1_000_000} Mbit/s" if self.rate_bit >= 1_000_000
                else f"{self.rate_bit // 1000} kbit/s")
        return f"{self.rtt_s * 1000:.0f} ms RTT, {rate}"


def parse_links(spec: str, parse_size: Callable[[str], int]) -> list[Link]:
    """'20ms:100mbit,100ms:10mbit@128M' -> links; '@SIZE' gives that link its
    own lazy image size."""
    links = []
    for part in filter(None, spec.split(",")):
        part, _, size = part.strip().lower().partition("@")
        rtt, rate = part.split(":")
        rtt_s = float(rtt.removesuffix("ms")) / 1000
        mult = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}
        rate_bit = int(rate) if rate.isdigit() else 0
        for suffix, m in mult.items():
            if rate.endswith(suffix):
                rate_bit = int(float(rate.removesuffix(suffix)) * m)
                break
        links.append(Link(rtt_s, rate_bit, parse_size(size) if size else None))
    return links


# --- the server: nginx with directory listings (rclone needs them) -----------------

@contextlib.contextmanager
def served(root: Path, link: Link) -> Iterator:
    """Like incfs.testing.link.shaped_http_server, plus `autoindex on` so that
    rclone's http backend can list directories."""
    from incfs.testing.faultproxy import FaultProxy
    from incfs.testing.netns import EmulatedLink
    from incfs.testing.nginx import Nginx

    class ListingNginx(Nginx):
        def _write_config(self) -> None:
            super()._write_config()
            conf = self._require_prefix() / "nginx.conf"
            text = conf.read_text()
            conf.write_text(text.replace("limit_except GET { deny all; }",
                                         "limit_except GET { deny all; }\n            autoindex on;"))

    with contextlib.ExitStack() as stack:
        net = stack.enter_context(EmulatedLink(link.rate_bit))
        nginx = stack.enter_context(ListingNginx(root, host=net.ns_addr, netns=net.ns_name))
        proxy = stack.enter_context(FaultProxy(nginx.address, delay_up=link.rtt_s / 2,
                                               delay_down=link.rtt_s / 2,
                                               connect_delay=link.rtt_s))
        yield proxy


# --- the program ------------------------------------------------------------------------

_PROGRAM = r"""
import os, sys
mode, root, files = sys.argv[1], sys.argv[2], sys.argv[3:]
total = 0
for rel in files:
    fd = os.open(os.path.join(root, rel), os.O_RDONLY)
    try:
        if mode == "first":
            total += len(os.read(fd, 1))
            break
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            total += len(b)
    finally:
        os.close(fd)
print(total)
"""


class TimedOut(Exception):
    pass


def run_program(root: Path, case: str, tree: LazyTree, timeout: float) -> int:
    """Run the touching program (or `ls -R`) against `root`: bytes read."""
    if case == "ls10k":
        argv = ["ls", "-R", str(root)]
    elif case == "ttfb":
        argv = [PYTHON, "-S", "-c", _PROGRAM, "first", str(root), tree.files[0]]
    else:
        argv = [PYTHON, "-S", "-c", _PROGRAM, "all", str(root), *tree.touched(int(case[5:]))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimedOut() from None
    if proc.returncode != 0:
        raise RuntimeError(f"program failed ({proc.returncode}): {err.strip()[-300:]}")
    return 0 if case == "ls10k" else int(out.strip().splitlines()[-1])


# --- approaches -----------------------------------------------------------------------------

class Approach:
    name = "?"
    label = "?"
    unavailable: str | None = None
    failures = 0

    def check(self) -> None:
        """Raise Unavailable when the tool is missing."""

    def finish(self) -> None:
        """The run is over: stop what the approach left running."""

    @contextlib.contextmanager
    def mounted(self, url_base: str, what: str, mnt: Path, work: Path) -> Iterator[Path]:
        """Mount `what` ('data' or 'meta') lazily; yield the tree's root."""
        raise NotImplementedError
        yield mnt


class IncfsLazy(Approach):
    name, label = "incfs", "incfs (lazy)"
    prefetch = "none"

    def __init__(self) -> None:
        self.last_status: dict = {}

    def start(self, url: str, mnt: Path, cache: Path) -> None:
        """Mount `url` at `mnt` with its cache at `cache`, as this approach does."""
        from incfs.mount import MountConfig, mount_background
        try:
            mount_background(MountConfig(source=url, mountpoint=str(mnt), cache=str(cache),
                                         allow_unsigned=True, prefetch=self.prefetch))
        except Exception as e:
            raise Unavailable(f"remote mount failed: {_one_line(e)}{_daemon_log_tail(mnt)}") from None

    @contextlib.contextmanager
    def mounted(self, url_base, what, mnt, work):
        from incfs.mount import umount
        from systems import read_status
        cache = work / "lazy-cache.img"
        cache.unlink(missing_ok=True)
        clean_mountpoint(str(mnt))
        self.start(f"{url_base}{what}.img", mnt, cache)
        try:
            yield mnt
            self.last_status = read_status(mnt)
        finally:
            try:
                umount(str(mnt), timeout=30)
            except OSError:
                fuse_umount(str(mnt))
            cache.unlink(missing_ok=True)


class IncfsPrefetch(IncfsLazy):
    name, label = "incfs-prefetch", "incfs (lazy, prefetch sequential: the default)"
    prefetch = "sequential"


class IncfsCommand(IncfsLazy):
    """The `incfs mount` command as a user types it, with the warm process
    on (incfs.warm, the default): the first mount of a run starts cold and
    leaves the warm process behind, later ones are started by it (each run's
    status says which: `warm_start`)."""
    name, label = "incfs-command", "incfs mount command (warm process)"

    def check(self) -> None:
        # A warm process left by an earlier run (other code, other conditions)
        # refuses this run's commands, and its presence keeps them from
        # leaving their own: every mount would start cold.
        self.finish()

    def finish(self) -> None:
        from incfs import warm

        warm.stop()

    warm = "1"  # INCFS_WARM for the command

    def start(self, url: str, mnt: Path, cache: Path) -> None:
        done = subprocess.run([str(Path(sys.executable).with_name("incfs")), "mount",
                               "--allow-unsigned", "--prefetch", self.prefetch, "--cache",
                               str(cache), url, str(mnt)],
                              capture_output=True, text=True,
                              env={**os.environ, "INCFS_WARM": self.warm})
        if done.returncode:
            raise Unavailable(f"remote mount failed: {_one_line(done.stderr)}")


class IncfsCold(IncfsCommand):
    """The `incfs mount` command with the warm process off: each mount is a
    cold start (a machine's first mount, or one after the warm process's
    idle time), so a run's median is of cold starts, not of one."""
    name, label = "incfs-cold", "incfs mount command (cold: INCFS_WARM=0)"
    warm = "0"


class Rclone(Approach):
    name, label = "rclone", "rclone mount (http)"
    cache_mode = "off"

    def check(self) -> None:
        if not which("rclone"):
            raise Unavailable("rclone not installed (apt-get install rclone)")

    @contextlib.contextmanager
    def mounted(self, url_base, what, mnt, work):
        clean_mountpoint(str(mnt))
        cache = work / "rclone-cache"
        shutil.rmtree(cache, ignore_errors=True)
        # the full cache mode needs sizes (HEAD); streaming does without
        no_head = ["--http-no-head"] if self.cache_mode == "off" else []
        proc = subprocess.Popen(
            ["rclone", "mount", ":http:", str(mnt), "--http-url", f"{url_base}{what}-tree/",
             *no_head, "--read-only", "--vfs-cache-mode", self.cache_mode,
             "--cache-dir", str(cache), "--allow-other",
             "--config", "/dev/null", "--log-level", "ERROR"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            wait_mounted(str(mnt), timeout=60, proc=proc)
            yield mnt
        finally:
            _stop_fuse(mnt, proc)


class RcloneFull(Rclone):
    """rclone with its persistent cache (sparse files filled as read): the
    mode that matches incfs's cache."""
    name, label = "rclone-full", "rclone mount (http, --vfs-cache-mode full)"
    cache_mode = "full"


class Httpfs2(Approach):
    name, label = "httpfs2", "httpfs2 + squashfuse"

    def check(self) -> None:
        for tool, pkg in (("httpfs2", "httpfs2"), ("squashfuse", "squashfuse"),
                          ("mksquashfs", "squashfs-tools")):
            if not which(tool):
                raise Unavailable(f"{tool} not installed (apt-get install {pkg})")

    @contextlib.contextmanager
    def mounted(self, url_base, what, mnt, work):
        clean_mountpoint(str(mnt))
        low = work / "httpfs2-mnt"
        clean_mountpoint(str(low))
        http = subprocess.Popen(["httpfs2", "-f", "-c", "/dev/null", f"{url_base}{what}.sqfs", str(low)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        squash = None
        try:
            wait_mounted(str(low), timeout=60, proc=http)
            _probe_squashfs(low / f"{what}.sqfs")
            squash = subprocess.Popen(["squashfuse", "-f", "-o", "allow_other",
                                       str(low / f"{what}.sqfs"), str(mnt)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
            wait_mounted(str(mnt), timeout=60, proc=squash)
            yield mnt
        finally:
            if squash is not None:
                _stop_fuse(mnt, squash)
            _stop_fuse(low, http)


def _probe_squashfs(path: Path) -> None:
    """httpfs2 0.1.4 (Debian 12) fails some reads against nginx ("GET: reply
    does not contain end of header"): say so instead of timing garbage."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            magic = os.pread(fd, 4, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise Unavailable(f"httpfs2 mounted, but reading through it fails ({e.strerror}); "
                          "httpfs2 0.1.4 mis-parses nginx's replies") from None
    if magic != b"hsqs":
        raise Unavailable(f"httpfs2 returned wrong bytes ({magic!r} for the squashfs magic)")


def _stop_fuse(mnt: Path, proc: subprocess.Popen) -> None:
    fuse_umount(str(mnt))
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _daemon_log_tail(mnt: Path) -> str:
    with contextlib.suppress(Exception):
        from incfs.mount import runtime_dir
        log = runtime_dir(str(mnt)).parent / "daemon.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines[-40:] if "Error" in ln or "error" in ln]
        if errs:
            return f" (daemon: {errs[-1].strip()[:200]})"
    return ""


# --- the run ------------------------------------------------------------------------------------

@contextlib.contextmanager
def wire_timeline(proxy, path: Path, interval: float = 0.1):
    """With INCFS_BENCH_TIMELINE set: the bytes the proxy delivered, every
    `interval` seconds of a case, to `path` as "seconds,bytes" lines (where a
    run leaves the link idle, against another approach's or the download's)."""
    if not os.environ.get("INCFS_BENCH_TIMELINE"):
        yield
        return
    import threading

    done = threading.Event()
    rows: list[str] = []

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(interval):
            rows.append(f"{time.perf_counter() - t0:.2f},{proxy.bytes_down}")

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        path.write_text("\n".join(rows) + "\n")


def case_list(fractions: list[int], with_ls: bool) -> list[tuple[str, str]]:
    cases = [("ttfb", "time to first byte")]
    cases += [(f"touch{f}", f"program touching {f}%") for f in fractions]
    if with_ls:
        cases.append(("ls10k", "ls -R of a 10k-file image"))
    return cases


def prepare_served(work: Path, tree: LazyTree, meta_root: Path | None,
                   log: Callable[[str], None]) -> Path:
    """The served directory: data.img (incfs, zstd), data.sqfs, data-tree/
    and the same for the 10k-file tree as meta.*"""
    from incfs.pack import pack
    root = work / "served"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for what, src in (("data", tree.root), ("meta", meta_root)):
        if src is None:
            continue
        log(f"  packing the lazy {what} image")
        pack(src, root / f"{what}.img", compress="zstd")
        os.symlink(src, root / f"{what}-tree")
        if which("mksquashfs"):
            run(["mksquashfs", str(src), str(root / f"{what}.sqfs"), "-comp", "zstd", "-noappend",
                 "-quiet", "-no-progress", "-processors", "2"])
    os.sync()
    return root


def run_lazy(links: list[Link], build_tree: Callable[[int], LazyTree], default_size: int,
             meta_root: Path | None, work: Path, reps: int, fractions: list[int],
             approaches_wanted: list[str] | None, log: Callable[[str], None]) -> dict:
    from incfs.testing.netns import missing_feature

    out: dict = {}
    why = missing_feature()
    all_approaches: list[Approach] = [IncfsLazy(), IncfsPrefetch(), IncfsCommand(), IncfsCold(),
                                      Rclone(), RcloneFull(), Httpfs2()]
    approaches = [a for a in all_approaches if not approaches_wanted or a.name in approaches_wanted]
    for a in approaches:
        try:
            a.check()
        except Unavailable as e:
            a.unavailable = str(e)
    cases = case_list(fractions, meta_root is not None)
    mnt = work / "lazy-mnt"
    built_size, tree, served_root = None, None, None
    for link in links:
        size = link.size or default_size
        if size != built_size:
            log(f" building the lazy tree: {size / MiB:.0f} MiB")
            tree = build_tree(size)
            served_root = prepare_served(work, tree, meta_root, log)
            built_size = size
        image_bytes = (served_root / "data.img").stat().st_size
        body: dict = {"rtt_s": link.rtt_s, "rate_bit": link.rate_bit, "image_bytes": image_bytes,
                      "data_bytes": size}
        out[link.name] = body
        if why:
            body["unavailable"] = f"no emulated link here: {why}"
            continue
        # a run that takes this long is stopped and shown as "more than"
        expected = image_bytes * 8 / link.rate_bit
        timeout = max(30.0, 4 * expected + 200 * link.rtt_s)
        samples: dict[str, dict[str, Samples]] = {
            c: {a: Samples("s", False) for a in ["download"] + [x.name for x in approaches]}
            for c, _ in cases}
        wire: dict[str, dict[str, list[float]]] = {c: {} for c, _ in cases}
        timeouts: dict[str, dict[str, int]] = {c: {} for c, _ in cases}
        fetched_status: dict[str, list[int]] = {}
        log(f" link {link.name}")
        with served(served_root, link) as proxy:
            base = proxy.url("/")
            for rep in range(reps):
                _run_download(base, tree, meta_root, work, mnt, cases, samples, wire, proxy, rep,
                              reps, timeout, log)
                for a in approaches:
                    if a.unavailable:
                        continue
                    for case, _label in cases:
                        what = "meta" if case == "ls10k" else "data"
                        proxy.reset_counters()
                        t0 = time.perf_counter()
                        try:
                            with a.mounted(base, what, mnt, work) as root, \
                                    wire_timeline(proxy, work / f"wire-{a.name}-{case}.csv"):
                                nbytes = run_program(root, case, tree, timeout)
                                seconds = time.perf_counter() - t0
                        except TimedOut:
                            seconds, nbytes = timeout, 0
                            timeouts[case][a.name] = timeouts[case].get(a.name, 0) + 1
                        except Unavailable as e:
                            a.unavailable = str(e)
                            log(f"  {a.label}: unavailable: {e}")
                            break
                        except Exception as e:  # once may be bad luck; twice is a verdict
                            a.failures += 1
                            log(f"  {a.label}: FAILED: {e}\n{traceback.format_exc()}")
                            if a.failures >= 2:
                                a.unavailable = f"failed: {_one_line(e)}"
                                break
                            continue
                        samples[case][a.name].values.append(seconds)
                        if nbytes > 0 and case != "ttfb":
                            wire[case].setdefault(a.name, []).append(proxy.bytes_down / nbytes)
                        if a.name == IncfsLazy.name and case.startswith("touch"):
                            fetched_status.setdefault(case, []).append(
                                a.last_status.get("bytes_fetched", 0))
                        log(f"  rep {rep + 1}/{reps} {a.label:22s} {case:9s} {seconds:8.2f} s  "
                            f"wire {proxy.bytes_down / MiB:8.1f} MiB")
        body["approaches"] = {"download": {"label": "download, then run"}}
        for a in approaches:
            body["approaches"][a.name] = {"label": a.label}
            if a.unavailable:
                body["approaches"][a.name]["unavailable"] = a.unavailable
        for a in all_approaches:
            if a not in approaches:
                body["approaches"][a.name] = {"label": a.label, "unavailable": "not selected"}
        body["cases"] = {}
        for case, label in cases:
            ref = samples[case]["download"]
            cell_all = {}
            for name, s in samples[case].items():
                cell = {"median": s.median, "values": s.values}
                if s.values and ref.values and ref.median:
                    cell["vs_download"] = s.median / ref.median
                if wire[case].get(name):
                    cell["amplification"] = median(wire[case][name])
                if timeouts[case].get(name):
                    cell["timeouts"] = timeouts[case][name]
                if name == "incfs" and fetched_status.get(case):
                    cell["bytes_fetched_status"] = median(fetched_status[case])
                cell_all[name] = cell
            body["cases"][case] = {"label": label, "approaches": cell_all}
    for a in approaches:
        a.finish()
    return out


def _run_download(base, tree, meta_root, work, mnt, cases, samples, wire, proxy, rep, reps,
                  timeout, log) -> None:
    """The reference: download each image once per repetition, then run
    every case against the local copy; time = download + mount + run."""
    from incfs.mount import MountConfig, mount_background, umount
    downloads: dict[str, tuple[float, int]] = {}
    for what in ("data", "meta"):
        if what == "meta" and meta_root is None:
            continue
        dest = work / f"downloaded-{what}.img"
        dest.unlink(missing_ok=True)
        proxy.reset_counters()
        t0 = time.perf_counter()
        with wire_timeline(proxy, work / f"wire-download-{what}.csv"):
            run(["curl", "-sS", "--fail", "-o", str(dest), f"{base}{what}.img"],
                timeout=timeout * 2)
        downloads[what] = (time.perf_counter() - t0, proxy.bytes_down)
    for case, _ in cases:
        what = "meta" if case == "ls10k" else "data"
        dl_seconds, dl_bytes = downloads[what]
        dest = work / f"downloaded-{what}.img"
        clean_mountpoint(str(mnt))
        t0 = time.perf_counter()
        mount_background(MountConfig(source=str(dest), mountpoint=str(mnt), allow_unsigned=True,
                                     prefetch="none"))
        try:
            nbytes = run_program(mnt, case, tree, timeout)
        finally:
            umount(str(mnt))
        seconds = dl_seconds + time.perf_counter() - t0
        samples[case]["download"].values.append(seconds)
        if nbytes > 0 and case != "ttfb":
            wire[case].setdefault("download", []).append(dl_bytes / nbytes)
        log(f"  rep {rep + 1}/{reps} {'download, then run':22s} {case:9s} {seconds:8.2f} s  "
            f"(download {dl_seconds:.2f} s)")
    for what in downloads:
        (work / f"downloaded-{what}.img").unlink(missing_ok=True)
