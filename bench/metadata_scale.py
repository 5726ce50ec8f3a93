#!/usr/bin/env python3
"""Metadata at scale: incfs against mksquashfs and EROFS on one tree of N
small files (N/1000 directories of 1000 files, every 100th with a line of
text, the rest empty: the tree of tests/test_pack.py::test_million_files).

For each system, in one run: the time and peak RSS of building the image;
for incfs, opening the image, the mount until ready and the daemon's RSS
after the walks; for incfs and EROFS, `find` and `ls -R` over the mount,
cold (fresh mount, caches dropped) and second pass. Needs root (mounts, drop
caches). Ratios are against EROFS / mksquashfs measured in the same run.

With --tar-stream incfs packs the same tree from a ustar stream on stdin
(`bench/tarstream.py DIRS | incfs pack - IMG`), so no tree is made on disk
for it; the references need one, made only with --tree. A reference whose
builder would not fit in memory at this size (from its peak at a million
files, scaled) is skipped with the reason printed, as is one with no tree.

    sudo .venv/bin/python bench/metadata_scale.py --files 1000000
    sudo .venv/bin/python bench/metadata_scale.py --files 10000000 --tar-stream --no-ls \
        --work /var/tmp/big
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Unavailable, clean_mountpoint, drop_caches, which  # noqa: E402
from systems import Erofs  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
# Peak RSS of each reference builder per million files of this tree, measured
# at a million (docs/performance.md): mksquashfs 453 MiB, mkfs.erofs 1.5 ~4.5 GiB.
BUILDER_BYTES_PER_MILLION = {"mksquashfs": 453 * MiB, "mkfs.erofs": 4.5 * GiB}
WALK_TIMEOUT = 3 * 3600

# Runs a command as a child and prints its wall time and peak RSS (KiB):
# RUSAGE_CHILDREN of a fresh process is the peak of its largest child. argv
# ending in "<", PATH reads stdin from PATH; "<|", ARGV... from that
# command's output (a stream writer, a few MiB: the peak stays the packer's).
_MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    argv, feed = sys.argv[1:], None
    for mark in ("<", "<|"):
        if mark in argv:
            at = argv.index(mark)
            argv, source = argv[:at], argv[at + 1:]
            feed = (open(source[0], "rb") if mark == "<" else
                    subprocess.Popen(source, stdout=subprocess.PIPE).stdout)
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stdin=feed)
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")

_OPEN = textwrap.dedent("""
    import json, resource, sys, time
    from incfs.image import Image
    t = time.perf_counter()
    img = Image.open(sys.argv[1])
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "inodes": len(img.ns),
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def measured(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *argv], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def make_tree(root: Path, files: int) -> float:
    t = time.perf_counter()
    root.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "incfs.testing.smalltree", str(root),
                    str(max(1, files // 1000))],
                   check=True)
    return time.perf_counter() - t


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=WALK_TIMEOUT)
    return time.perf_counter() - t


def walks(mounted, root: Path, ls: bool = True) -> dict:
    """find cold and second, then (with `ls`) ls -R cold (on a fresh mount) and second."""
    out = {}
    with mounted() as extra:
        drop_caches()
        out["find_cold"] = timed(["find", str(root)])
        out["find_second"] = timed(["find", str(root)])
        out.update(extra())
    if not ls:
        return out
    with mounted() as _extra:
        drop_caches()
        out["ls_cold"] = timed(["ls", "-R", str(root)])
        out["ls_second"] = timed(["ls", "-R", str(root)])
    return out


def proc_memory(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class _IncfsMount:
    def __init__(self, image: Path, mnt: Path):
        self.image, self.mnt = image, mnt
        self.ready: list[float] = []

    def __call__(self):
        import contextlib
        from incfs.mount import MountConfig, mount_background, umount

        @contextlib.contextmanager
        def cm():
            clean_mountpoint(str(self.mnt))
            drop_caches()
            t = time.perf_counter()
            mount_background(MountConfig(source=str(self.image), mountpoint=str(self.mnt),
                                         allow_unsigned=True, prefetch="none"))
            self.ready.append(time.perf_counter() - t)
            pid = int(json.loads((self.mnt / ".incfs" / "status").read_text())["pid"])
            try:
                yield lambda: {"daemon_memory": proc_memory(pid)}
            finally:
                umount(str(self.mnt))
        return cm()


class _ErofsMount:
    def __init__(self, erofs: Erofs, mnt: Path):
        self.erofs, self.mnt = erofs, mnt

    def __call__(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            with self.erofs.mounted(self.mnt):
                yield lambda: {}
        return cm()


def run(files: int, work: Path, tree_dir: Path | None, stream: bool = False,
        ls: bool = True) -> dict:
    result: dict = {"files": files, "dirs": max(1, files // 1000),
                    "incfs_input": "tar stream on stdin" if stream else "tree"}
    if tree_dir is not None and tree_dir.exists():
        raise Unavailable(f"{tree_dir} exists: give a new path (it is made and removed)")
    tree = None
    if not stream or tree_dir is not None:
        tree = tree_dir or Path(tempfile.mkdtemp(prefix="incfs-meta-", dir="/dev/shm")) / "tree"
        result["create_seconds"] = make_tree(tree, files)
    try:
        result.update(build_all(tree, work, files, stream))
    finally:
        if tree is not None:
            shutil.rmtree(tree if tree_dir else tree.parent, ignore_errors=True)
    mnt = work / "mnt"
    result["incfs"].update(walks(_IncfsMount(work / "incfs.img", mnt), mnt, ls))
    ready = _IncfsMount(work / "incfs.img", mnt)
    with ready():
        pass
    result["incfs"]["mount_ready_seconds"] = ready.ready[0]
    if result.get("erofs", {}).get("available"):
        erofs = Erofs()
        erofs.image = work / "erofs.img"
        result["erofs"].update(walks(_ErofsMount(erofs, mnt), mnt, ls))
    return result


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f
                    if line.startswith("MemAvailable:"))


def why_not(tool: str, tree: Path | None, files: int) -> str | None:
    """Why reference `tool` cannot be built here, or None."""
    if not which(tool):
        return f"{tool} missing"
    if tree is None:
        return "no tree on disk (--tar-stream without --tree)"
    need = BUILDER_BYTES_PER_MILLION[tool] * files / 1e6
    have = mem_available()
    if need > 0.8 * have:
        return (f"would not fit: ~{need / GiB:.1f} GiB of RSS at {files:,} files (its peak at a "
                f"million, scaled), {have / GiB:.1f} GiB available")
    return None


def _skipped(tool: str, why: str) -> dict:
    print(f"skipping {tool}: {why}", flush=True)
    return {"available": False, "why": why}


def pack_incfs(tree: Path | None, image: Path, files: int, stream: bool) -> dict:
    argv = [sys.executable, "-m", "incfs.cli", "pack", "-" if stream else str(tree), str(image),
            "--compress", "zstd", "--max-entries", str(2 * files + 100)]
    if stream:
        argv += ["<|", sys.executable, str(Path(__file__).resolve().parent / "tarstream.py"),
                 str(max(1, files // 1000))]
    return measured(argv)


def build_all(tree: Path | None, work: Path, files: int = 0, stream: bool = False) -> dict:
    out: dict = {}
    image = work / "incfs.img"
    image.unlink(missing_ok=True)
    out["incfs"] = {"pack": pack_incfs(tree, image, files, stream)}
    out["incfs"]["image_bytes"] = image.stat().st_size
    opened = subprocess.run([sys.executable, "-c", _OPEN, str(image)], check=True,
                            capture_output=True, text=True)
    out["incfs"]["open"] = json.loads(opened.stdout)
    why = why_not("mksquashfs", tree, files)
    if why is None:
        sq = work / "squash.img"
        sq.unlink(missing_ok=True)
        out["squashfs"] = {"build": measured(["mksquashfs", str(tree), str(sq), "-comp", "zstd",
                                              "-noappend", "-quiet", "-no-progress"]),
                           "image_bytes": sq.stat().st_size}
        sq.unlink()
    else:
        out["squashfs"] = _skipped("mksquashfs", why)
    why = why_not("mkfs.erofs", tree, files)
    if why is None:
        er = work / "erofs.img"
        er.unlink(missing_ok=True)
        out["erofs"] = {"available": True,
                        "build": measured(["mkfs.erofs", "--quiet", str(er), str(tree)]),
                        "image_bytes": er.stat().st_size}
    else:
        out["erofs"] = _skipped("mkfs.erofs", why)
    return out


def summary(r: dict) -> list[str]:
    inc, sq, er = r["incfs"], r.get("squashfs", {}), r.get("erofs", {})
    made = (f"tree made in {r['create_seconds']:.1f} s" if "create_seconds" in r
            else "no tree made")
    lines = [f"{r['files']:,} files in {r['dirs']:,} directories ({made}); incfs from "
             f"{r['incfs_input']}"]
    p = inc["pack"]
    lines.append(f"incfs pack {p['seconds']:.1f} s, peak RSS {p['peak_rss_kib'] / 1024:.0f} MiB, "
                 f"image {inc['image_bytes'] / MiB:.0f} MiB")
    for name, ref in (("mksquashfs", sq), ("mkfs.erofs", er)):
        if "why" in ref:
            lines.append(f"{name} skipped: {ref['why']}")
    if "build" in sq:
        b = sq["build"]
        lines.append(f"mksquashfs {b['seconds']:.1f} s, peak RSS {b['peak_rss_kib'] / 1024:.0f} MiB"
                     f" (incfs/mksquashfs time {p['seconds'] / b['seconds']:.2f}x)")
    if "build" in er:
        b = er["build"]
        lines.append(f"mkfs.erofs {b['seconds']:.1f} s, peak RSS {b['peak_rss_kib'] / 1024:.0f} MiB")
    o = inc["open"]
    lines.append(f"incfs Image.open {o['seconds'] * 1000:.0f} ms (peak RSS "
                 f"{o['peak_rss_kib'] / 1024:.0f} MiB); mount until ready "
                 f"{inc['mount_ready_seconds']:.2f} s")
    mem = inc.get("daemon_memory", {})
    if mem:
        lines.append(f"daemon after find x2: RSS {mem['VmRSS'] / MiB:.0f} MiB (anon "
                     f"{mem['RssAnon'] / MiB:.0f}, file {mem['RssFile'] / MiB:.0f}), peak "
                     f"{mem['VmHWM'] / MiB:.0f} MiB")
    for key, label in (("find_cold", "find cold"), ("find_second", "find 2nd"),
                       ("ls_cold", "ls -R 1st"), ("ls_second", "ls -R 2nd")):
        if key not in inc:
            continue
        line = f"{label:10} incfs {inc[key]:.2f} s"
        if key in er:
            line += f", EROFS {er[key]:.2f} s, speed ratio {er[key] / inc[key]:.2f}"
        lines.append(line)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--work", type=Path, default=None,
                    help="where the images go (a disk, not tmpfs: cold means from disk)")
    ap.add_argument("--tree", type=Path, default=None,
                    help="a new path where the tree is made and removed (default: under /dev/shm)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--tar-stream", action="store_true",
                    help="incfs packs a generated tar on stdin (no tree on disk for it)")
    ap.add_argument("--no-ls", action="store_true", help="only the find walks")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("metadata_scale needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="incfs-meta-work-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.files, work, args.tree, args.tar_stream, not args.no_ls)
    except Unavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 2
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    publish(result, summary, args.json)
    return 0


def publish(result: dict, summarize, json_path: Path | None) -> None:
    """Print a bench's summary and write its JSON, with the command that made it."""
    result = {"command": " ".join(sys.argv), **result}
    print("\n".join(summarize(result)))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
