#!/usr/bin/env python3
"""Cold walks, interleaved: the same walk (`ls -R` or `find`) over images
that already exist, one system after another in each round, so that code
versions (or image formats) and EROFS are compared under the same load.

Each incfs case is LABEL=SRC:IMAGE: the daemon runs with PYTHONPATH=SRC
(a worktree's src/), so two versions of the code can be compared; EROFS is
mounted from its image file. A round mounts each system afresh, drops the
page cache, times the walk (cold), times it again (second) and unmounts.
Prints each run and the medians; needs root (mounts, drop_caches).

    sudo .venv/bin/python bench/cold_walks.py --rounds 5 --walk ls \\
        --incfs base=/work/base/src:/var/tmp/base.img \\
        --incfs new=src:/var/tmp/new.img --erofs /var/tmp/erofs.img --mnt /tmp/walk-mnt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import clean_mountpoint, drop_caches, sys_mount, sys_umount  # noqa: E402

# ls-l: `ls -lR`, which asks every file for its security.selinux attribute
WALKS = {"ls": ["ls", "-R"], "ls-l": ["ls", "-lR"], "find": ["find"]}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def walk_pair(walk: list[str], mnt: Path, pid: int | None = None) -> dict:
    drop_caches()
    before = cpu_seconds(pid) if pid else 0.0
    out = {"cold": timed([*walk, str(mnt)])}
    if pid:
        out["daemon_cpu"] = cpu_seconds(pid) - before
    out["second"] = timed([*walk, str(mnt)])
    return out


def one_incfs(image: str, mnt: str, walk: str) -> dict:
    """In a child run with the case's PYTHONPATH: mount, walk, unmount."""
    from incfs.mount import MountConfig, mount_background, umount
    clean_mountpoint(mnt)
    mount_background(MountConfig(source=image, mountpoint=mnt, allow_unsigned=True,
                                 prefetch="none"))
    try:
        pid = int(json.loads((Path(mnt) / ".incfs" / "status").read_text())["pid"])
        return walk_pair(WALKS[walk], Path(mnt), pid)
    finally:
        umount(mnt)


def run_incfs(src: str, image: str, mnt: Path, walk: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    out = subprocess.run([sys.executable, __file__, "--one", image, str(mnt), walk],
                         env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout)


def run_erofs(image: str, mnt: Path, walk: str) -> dict:
    clean_mountpoint(str(mnt))
    sys_mount(image, str(mnt), "erofs")
    try:
        return walk_pair(WALKS[walk], mnt)
    finally:
        sys_umount(str(mnt))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--incfs", action="append", default=[], metavar="LABEL=SRC:IMAGE")
    ap.add_argument("--erofs", help="an EROFS image of the same tree")
    ap.add_argument("--walk", choices=sorted(WALKS), default="ls")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mnt", type=Path, required=False)
    ap.add_argument("--json", type=Path, help="write every run here too")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_incfs(*args.one)))
        return 0
    if os.geteuid() != 0 or args.mnt is None:
        print("cold_walks needs root and --mnt", file=sys.stderr)
        return 2
    cases = [(label, *spec.rsplit(":", 1)) for label, _, spec in
             (c.partition("=") for c in args.incfs)]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in cases}
    if args.erofs:
        runs["erofs"] = []
    for r in range(args.rounds):
        for label, src, image in cases:
            runs[label].append(run_incfs(src, image, args.mnt, args.walk))
            print(f"round {r} {label:8} {json.dumps(runs[label][-1])}", flush=True)
        if args.erofs:
            runs["erofs"].append(run_erofs(args.erofs, args.mnt, args.walk))
            print(f"round {r} {'erofs':8} {json.dumps(runs['erofs'][-1])}", flush=True)
    report(runs, args.walk)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


def report(runs: dict[str, list[dict]], walk: str) -> None:
    erofs = statistics.median(r["cold"] for r in runs["erofs"]) if "erofs" in runs else None
    for label, got in runs.items():
        cold = statistics.median(r["cold"] for r in got)
        second = statistics.median(r["second"] for r in got)
        each = ", ".join(f"{r['cold']:.3f}" for r in got)
        line = f"{walk} {label:8} cold median {cold:.3f} s (runs {each}), second {second:.3f} s"
        if "daemon_cpu" in got[0]:
            line += f", daemon CPU {statistics.median(r['daemon_cpu'] for r in got):.2f} s"
        if erofs:
            line += f", ratio to EROFS {erofs / cold:.2f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
