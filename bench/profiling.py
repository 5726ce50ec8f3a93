"""Where the daemon spends its time: py-spy (sampling, attached to the running
daemon) during a cold sequential read and a cold random 4 KiB run.

Falls back to cProfile (the daemon started under `python -m cProfile`,
`python -m incfs.mount CONFIG_JSON` in the foreground) when py-spy is not
installed; cProfile's overhead inflates Python-heavy code, so the py-spy
figures are the ones to trust.
"""

from __future__ import annotations

import collections
import json
import pstats
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from benchlib import Unavailable, clean_mountpoint, drop_caches, wait_mounted, which
import workloads as w

TOP = 25


def _pyspy() -> str | None:
    return which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                               if Path(sys.executable).with_name("py-spy").exists() else None)


def profile_incfs(image: Path, big_rel: str, work: Path, rand_ios: int, out_dir: Path,
                  log: Callable[[str], None]) -> dict:
    results = {}
    for case in ("seq_cold", "rand_cold"):
        log(f"  profiling {case} on {image.name}")
        results[case] = _profile_case(image, big_rel, work, case, rand_ios, out_dir)
    return results


def _workload(case: str, big: Path, rand_ios: int) -> float:
    drop_caches()
    if case == "seq_cold":
        return w.seq_read(big)
    return w.rand_read(big, rand_ios, 4242)


def _profile_case(image: Path, big_rel: str, work: Path, case: str, rand_ios: int,
                  out_dir: Path) -> dict:
    from incfs.mount import MountConfig
    mnt = work / "prof-mnt"
    clean_mountpoint(str(mnt))
    config = MountConfig(source=str(image), mountpoint=str(mnt), allow_unsigned=True,
                         prefetch="none")
    spy = _pyspy()
    prof_file = out_dir / f"profile-{case}.cprofile"
    argv = [sys.executable]
    if not spy:
        argv += ["-m", "cProfile", "-o", str(prof_file)]
    argv += ["-m", "incfs.mount", json.dumps(asdict(config))]
    daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_mounted(str(mnt), timeout=60, proc=daemon)
        time.sleep(0.3)
        if spy:
            raw = out_dir / f"profile-{case}.pyspy.txt"
            sampler = subprocess.Popen([spy, "record", "--pid", str(daemon.pid), "--rate", "500",
                                        "--format", "raw", "--nonblocking", "-o", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # let py-spy attach
            value = _workload(case, mnt / big_rel, rand_ios)
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=60)
            summary = summarize_collapsed(raw)
            summary.update({"tool": "py-spy", "raw": raw.name, "result": value})
        else:
            value = _workload(case, mnt / big_rel, rand_ios)
            summary = {"tool": "cProfile", "result": value}
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if not spy:
        if not prof_file.exists():
            raise Unavailable("cProfile wrote no profile")
        summary.update(summarize_cprofile(prof_file))
    return summary


def _short(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = Path(path).parts
    if "incfs" in parts:
        path = "/".join(parts[parts.index("incfs"):])
    else:
        path = Path(path).name
    return f"{name} ({path})"


def summarize_collapsed(raw: Path) -> dict:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    return {
        "samples": total,
        "self": [(f, round(100 * n / total, 1)) for f, n in self_t.most_common(TOP)],
        "inclusive": [(f, round(100 * n / total, 1)) for f, n in incl.most_common(TOP)],
    }


def summarize_cprofile(path: Path) -> dict:
    stats = pstats.Stats(str(path))
    total = stats.total_tt or 1.0
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        rows.append((f"{func} ({Path(file).name}:{line})", tt, ct))
    by_self = sorted(rows, key=lambda r: -r[1])[:TOP]
    by_incl = sorted(rows, key=lambda r: -r[2])[:TOP]
    return {"samples": None,
            "self": [(f, round(100 * tt / total, 1)) for f, tt, _ in by_self],
            "inclusive": [(f, round(100 * ct / total, 1)) for f, _, ct in by_incl]}


def format_profile(results: dict) -> str:
    lines = []
    for case, r in results.items():
        lines.append(f"\nprofile of the daemon, {case} ({r.get('tool')}, {r.get('samples')} samples):")
        lines.append("  self time:")
        lines += [f"    {pct:5.1f}%  {f}" for f, pct in r.get("self", [])[:12]]
        lines.append("  inclusive:")
        lines += [f"    {pct:5.1f}%  {f}" for f, pct in r.get("inclusive", [])[:15]]
    return "\n".join(lines)

