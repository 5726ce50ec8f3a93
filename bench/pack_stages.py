"""Peak RSS of `incfs pack` at its stages, for issue 11's memory target.

    PYTHONPATH=src python bench/pack_stages.py --make DIR --dirs 200   # the tree
    PYTHONPATH=src python bench/pack_stages.py DIR OUT.img             # pack it

The tree is test_million_files's: DIRS directories of 1,000 files, every
100th with one line. Prints VmHWM after reading the input and
numbering the inodes (for a directory one pass, for a tar or OCI input the
tree and then its walk), then the whole pack's seconds and peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


from incfs.testing.smalltree import make_tree  # noqa: E402


def vm_hwm_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024


def pack_with_stages(src: str, image: str) -> dict:
    import incfs.pack as P  # the hook wraps the packer's read-and-number stage

    stages: dict[str, int] = {}
    run = P._Packer.run

    def hooked_run(self, source):
        run(self, source)
        stages["numbered_mib"] = vm_hwm_mib()

    P._Packer.run = hooked_run
    t = time.perf_counter()
    stats = P.pack(src, image, compress="zstd", overwrite=True)
    return {"seconds": round(time.perf_counter() - t, 2), "files": stats.files,
            **stages, "peak_mib": vm_hwm_mib()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("image", nargs="?")
    ap.add_argument("--make", action="store_true", help="make the tree at SRC instead")
    ap.add_argument("--dirs", type=int, default=200)
    args = ap.parse_args()
    if args.make:
        make_tree(args.src, args.dirs)
    elif args.image:
        print(json.dumps(pack_with_stages(args.src, args.image)))
    else:
        sys.exit("an IMAGE to pack into, or --make")


if __name__ == "__main__":
    main()
