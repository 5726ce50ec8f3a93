#!/usr/bin/env python3
"""Mount until ready for a local image: `mount_background` of IMAGE, then a
`listdir` of its root, repeated; prints each time and the median (issue 11:
a 1,000,000-file image is ready within 0.3 s).

    sudo .venv/bin/python bench/mount_ready.py IMAGE [--reps 5]

Make a 1M-file image with incfs.testing.smalltree (make_tree(DIR, 1000))
and `incfs pack DIR IMAGE --compress zstd`. Run it with PYTHONPATH pointing
at the tree to measure (before/after)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from incfs.mount import MountConfig, mount_background, umount


def ready_ms(image: str) -> int:
    mnt = Path(tempfile.mkdtemp(prefix="mount-ready-"))
    try:
        t0 = time.perf_counter()
        mount_background(MountConfig(source=image, mountpoint=str(mnt), allow_unsigned=True))
        os.listdir(mnt)
        elapsed = round((time.perf_counter() - t0) * 1000)
        umount(str(mnt))
        return elapsed
    finally:
        mnt.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    runs = [ready_ms(os.path.abspath(args.image)) for _ in range(args.reps)]
    print(json.dumps({"image": args.image, "ready_ms": runs,
                      "median_ms": statistics.median(runs), "target_ms": 300}))


if __name__ == "__main__":
    main()
