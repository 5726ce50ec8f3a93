"""A Debian minbase rootfs used for real: programs run chrooted into the tree
itself (ext4, the reference) and into an incfs mount of its packed image, in
the same run, page cache warm and cold.

    python bench/debian_chroot.py [--work DIR] [--reps N] [--compress zstd|lz4|none]

First the mount is compared with the tree through the file system
(bench/fidelity.py: diff -r, type/mode/owners/device numbers/mtime, xattrs,
hard links, bytes). The programs are what a container does on start and a user does next: dpkg -l,
apt-cache policy, ls -lR /usr, a bash that execs 50 programs, perl -e,
sha256sum over /usr/bin. Each figure is native time / incfs time (higher is
better; issue 9 asks for >= 0.8 warm and >= 0.5 cold). Before timing, every
file of the mount is opened once so complete files are expanded and later
opens go passthrough (what a long-lived mount looks like); `--first-open`
times that first pass too. Needs root, debootstrap (BENCH_APT in the Makefile)
and a network path to a Debian mirror the first time (the tree is reused).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402
from benchlib import clean_mountpoint, drop_caches  # noqa: E402
from debian_rootfs import build_rootfs  # noqa: E402
from systems import expand_all, read_status  # noqa: E402

# (label, shell command run inside the chroot)
PROGRAMS: list[tuple[str, str]] = [
    ("dpkg -l", "dpkg -l > /dev/null"),
    ("apt-cache policy", "apt-cache policy > /dev/null"),
    ("ls -lR /usr", "ls -lR /usr > /dev/null"),
    ("bash: 50 execs", "for i in $(seq 50); do /bin/true; done"),
    ("perl -e", "perl -e 'print 1' > /dev/null"),
    ("sha256sum /usr/bin/*", "sha256sum /usr/bin/* > /dev/null"),
]


# A private mount namespace, the same for native and incfs: the tree bound
# read-only (else apt would write its package cache into the native tree and
# reuse it, while on the image it must rebuild it each time) and a tmpfs on
# its /tmp (apt wants a writable /tmp).
_IN_CHROOT = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
              'mount -t tmpfs tmpfs "$0/tmp" && exec chroot "$0" /bin/sh -c "$1"')


def run_programs(root: Path) -> dict[str, float]:
    """Seconds per program, chrooted into `root` (a failure stops the bench:
    a figure for a program that did not run would be a lie)."""
    times: dict[str, float] = {}
    for label, command in PROGRAMS:
        t = time.perf_counter()
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh",
                               "-c", _IN_CHROOT, str(root), command],
                              capture_output=True, text=True, timeout=600)
        times[label] = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"{label} failed in {root}: {done.stderr.strip()[-400:]}")
    times["all"] = sum(times.values())
    return times


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    from incfs.mount import MountConfig, mount_background, umount
    clean_mountpoint(str(mountpoint))
    # devices: /dev/null must work in the chroot; owners as stored (root's mount)
    mount_background(MountConfig(source=str(image), mountpoint=str(mountpoint),
                                 allow_unsigned=True, prefetch="none", devices=True,
                                 owners="stored"))
    try:
        yield mountpoint
    finally:
        umount(str(mountpoint))


def measure(root: Path, reps: int, cold: bool) -> dict[str, float]:
    runs: list[dict[str, float]] = []
    if not cold:
        run_programs(root)  # warm-up pass
    for _ in range(reps):
        if cold:
            drop_caches()
        runs.append(run_programs(root))
    return {label: statistics.median(r[label] for r in runs) for label in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/incfs-debian"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compress", default="zstd", choices=("zstd", "lz4", "none"))
    ap.add_argument("--first-open", action="store_true",
                    help="also time the first pass over a fresh mount (before expansion)")
    args = ap.parse_args()
    from incfs.pack import pack
    root = build_rootfs(args.work)
    image = args.work / f"chroot-{args.compress}.img"
    if not image.exists():
        pack(root, image, compress=args.compress)
    mountpoint = args.work / "mnt"
    mountpoint.mkdir(exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with mounted(image, mountpoint):
        problems = (fidelity.compare(str(root), str(mountpoint))
                    + fidelity.tool_differences(str(root), str(mountpoint)))
        diff = fidelity.diff_r(str(root), str(mountpoint))
        print(f"mount vs tree: {len(problems)} differences in metadata, xattrs, links or "
              f"bytes; diff -r {'clean' if not diff else 'differs'}")
        for p in problems[:20]:
            print("   ", p)
        if args.first_open:
            drop_caches()
            results["first"] = {"incfs": run_programs(mountpoint)}
        expand_all(mountpoint)
        for state, cold in (("warm", False), ("cold", True)):
            results[state] = {"native": measure(root, args.reps, cold),
                              "incfs": measure(mountpoint, args.reps, cold)}
        fuse = read_status(mountpoint).get("fuse", {})
    report(results, fuse)
    return 1 if problems or diff else 0


def report(results: dict, fuse: dict) -> None:
    print("\nDebian minbase chrooted: native time / incfs time (median; higher is better)")
    print("| program | warm native s | warm ratio | cold native s | cold ratio |")
    print("| --- | --- | --- | --- | --- |")
    for label in [p[0] for p in PROGRAMS] + ["all"]:
        w, c = results["warm"], results["cold"]
        print(f"| {label} | {w['native'][label]:.3f} | {w['native'][label] / w['incfs'][label]:.2f} "
              f"| {c['native'][label]:.3f} | {c['native'][label] / c['incfs'][label]:.2f} |")
    if "first" in results:
        print(f"first pass over a fresh mount (cold, before expansion): "
              f"{results['first']['incfs']['all']:.2f} s")
    print(f"requests the daemon saw: {fuse.get('requests')}")
    print(f"passthrough: {fuse.get('passthrough')}")


if __name__ == "__main__":
    sys.exit(main())
