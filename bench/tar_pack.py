#!/usr/bin/env python3
"""Pack time and peak RSS of `incfs pack` from a tar (issue 11: a million
files within 2x mksquashfs's time and 256 MiB), beside mksquashfs of the
same tree and incfs from the tree itself, in one run.

The tree is `incfs.testing.smalltree`'s (N/1000 directories of 1,000 files,
every 100th with one line); the tar is GNU tar's of it (`tar -C TREE -cf
- .`), plain and through zstd, and the plain one once more on stdin
(`incfs pack - IMG`). Each build is a fresh process; time is its wall time,
peak RSS its ru_maxrss. With --rounds 2 the builds alternate, so load from
other work falls on all of them alike.

    python bench/tar_pack.py --files 1000000 --json bench/results/tar-pack-1m.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metadata_scale import make_tree, measured, publish  # noqa: E402

MiB = 1 << 20


def builds(tree: Path, tar: Path, zst: Path, work: Path, files: int) -> dict[str, list[str]]:
    """Name -> argv of each build; "<" before a path means stdin from it."""
    limit = ["--max-entries", str(2 * files + 100)]
    incfs = [sys.executable, "-m", "incfs.cli", "pack"]
    out = work / "incfs.img"
    return {
        "mksquashfs": ["mksquashfs", str(tree), str(work / "squash.img"), "-comp", "zstd",
                       "-noappend", "-quiet", "-no-progress"],
        "incfs dir": [*incfs, str(tree), str(out), "--compress", "zstd", *limit],
        "incfs tar": [*incfs, str(tar), str(out), "--compress", "zstd", *limit],
        "incfs tar.zst": [*incfs, str(zst), str(out), "--compress", "zstd", *limit],
        "incfs stdin": [*incfs, "-", str(out), "--compress", "zstd", *limit, "<", str(tar)],
    }


def run(files: int, scratch: Path, rounds: int) -> dict:
    tree, tar, zst = scratch / "tree", scratch / "tree.tar", scratch / "tree.tar.zst"
    result: dict = {"files": files, "create_seconds": make_tree(tree, files)}
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tar), "."], check=True)
    subprocess.run(["zstd", "-q", "-T1", str(tar), "-o", str(zst)], check=True)
    result["tar_bytes"], result["zst_bytes"] = tar.stat().st_size, zst.stat().st_size
    plan = builds(tree, tar, zst, scratch, files)
    runs: dict[str, list[dict]] = {name: [] for name in plan}
    for _ in range(rounds):
        for name, argv in plan.items():
            for image in scratch.glob("*.img"):
                image.unlink()
            runs[name].append(measured(argv))
    result["runs"] = runs
    return result


def summary(r: dict) -> list[str]:
    best = {name: min(rs, key=lambda m: m["seconds"]) for name, rs in r["runs"].items()}
    sq = best["mksquashfs"]
    lines = [f"{r['files']:,} files; tar {r['tar_bytes'] / MiB:.0f} MiB, zstd "
             f"{r['zst_bytes'] / MiB:.1f} MiB"]
    for name, rs in r["runs"].items():
        times = " / ".join(f"{m['seconds']:.2f}" for m in rs)
        peaks = " / ".join(f"{m['peak_rss_kib'] / 1024:.0f}" for m in rs)
        ratio = best[name]["seconds"] / sq["seconds"]
        lines.append(f"{name:14} {times} s, peak RSS {peaks} MiB, time / mksquashfs "
                     f"{ratio:.2f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scratch", type=Path, default=None,
                    help="a new directory for the tree, the tars and the images (default: "
                         "under /dev/shm; removed at the end)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="tar-pack-", dir="/dev/shm"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.files, scratch, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    publish(result, summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
