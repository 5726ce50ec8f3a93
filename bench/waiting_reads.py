#!/usr/bin/env python3
"""What many waiting reads cost the daemon while they wait (reader_watch.py):
N reads of live processes wait in `incfs.waits.Waits` for blocks that never
come, for a few seconds, and the CPU time the process spends meanwhile is
measured two ways in one run:

  watched  each reader's process watched through a pidfd (the default)
  looked   no pidfds (as on a kernel before 5.3, or past MAX_WATCHED
           processes): each wait looks once a second whether its process runs

The readers are real processes (`sleep`), several reads each, as a busy
mount's are. Prints one JSON line.

    .venv/bin/python bench/waiting_reads.py [--reads 5000] [--processes 100] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

import trio

from incfs.waits import Waits


@contextmanager
def _no_pidfds(off: bool) -> Iterator[None]:
    real = os.pidfd_open

    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(38, "pidfd_open refused (bench)")

    if off:
        os.pidfd_open = refuse
    try:
        yield
    finally:
        os.pidfd_open = real


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


async def _wait_many(pids: list[int], reads: int, seconds: float) -> tuple[float, float]:
    """(CPU seconds, wall seconds) while `reads` reads wait for about
    `seconds` (longer when the loop is too busy to wake on time)."""
    waits = Waits(read_timeout=None)
    async with trio.open_nursery() as nursery:
        for i in range(reads):
            nursery.start_soon(waits.wait_all, [(i + 1, 0, 0)], pids[i % len(pids)])
        await trio.sleep(0.5)  # all of them waiting
        before, started = _cpu(), time.monotonic()
        await trio.sleep(seconds)
        used, wall = _cpu() - before, time.monotonic() - started
        nursery.cancel_scope.cancel()
    return used, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(args.processes)]
    out: dict = {"reads": args.reads, "processes": args.processes, "seconds": args.seconds}
    try:
        pids = [p.pid for p in procs]
        for name, off in (("watched", False), ("looked", True), ("watched", False)):
            with _no_pidfds(off):
                used, wall = trio.run(_wait_many, pids, args.reads, args.seconds)
            out.setdefault(name, []).append({
                "cpu_s": round(used, 4), "wall_s": round(wall, 2),
                "cpu_share": round(used / wall, 4)})
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # the share of one CPU the waits take: the cost itself, since watched
    # waits take next to nothing and a ratio of the two says little
    out["cpu_share_looked"] = out["looked"][0]["cpu_share"]
    out["cpu_share_watched"] = max(r["cpu_share"] for r in out["watched"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
