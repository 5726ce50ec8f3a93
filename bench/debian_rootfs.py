"""Fidelity on a real Debian userland: debootstrap a minbase bookworm tree,
pack it (from the directory, and from a GNU tar of it), and check that every
entry of the image equals the tree: type and whole mode, owners, device
numbers, mtime, symlink targets, extended attributes, hard links, and every
byte of every file.

    python bench/debian_rootfs.py [--work DIR] [--keep]

Needs root and the debootstrap package (BENCH_APT in the Makefile). The tree
is built once under --work and reused. Not part of `make test`: the
debootstrap alone takes minutes. Exit status 0 when everything matches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from incfs.image import Image
from incfs.pack import pack


def build_rootfs(work: Path) -> Path:
    root = work / "rootfs"
    if (root / "usr" / "bin" / "dpkg").exists():
        return root
    if shutil.which("debootstrap") is None:
        sys.exit("debootstrap is not installed (apt-get install debootstrap)")
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], check=True,
                   stdout=subprocess.DEVNULL)
    return root


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def compare(img: Image, root: Path, *, nanoseconds: bool = True,
            device_links: bool = True) -> list[str]:
    """Differences between the image and the tree (empty when they agree)."""
    problems: list[str] = []
    base = os.fsencode(root)
    nodes = {p: n for p, n in img.ns.walk()}
    seen_tree = {b""}
    inode_of: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = b"/" + os.path.relpath(full, base)
            seen_tree.add(rel)
            st = os.lstat(full)
            if stat.S_ISSOCK(st.st_mode) and not device_links:
                continue
            node = nodes.get(rel)
            if node is None:
                problems.append(f"{rel!r}: missing from the image")
                continue
            problems += _compare_one(img, rel, full, st, node, nanoseconds)
            if not stat.S_ISDIR(st.st_mode) and (device_links or stat.S_ISREG(st.st_mode)):
                key = (st.st_dev, st.st_ino)
                if inode_of.setdefault(key, node.ino) != node.ino:
                    problems.append(f"{rel!r}: hard link lost")
    extra = set(nodes) - seen_tree
    problems += [f"{p!r}: in the image only" for p in sorted(extra)[:20]]
    return problems


def _compare_one(img: Image, rel: bytes, full: bytes, st: os.stat_result, node,
                 nanoseconds: bool) -> list[str]:
    out = []
    want_mode = stat.S_IFLNK | 0o777 if stat.S_ISLNK(st.st_mode) else st.st_mode
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
    mtime = st.st_mtime_ns if nanoseconds else st.st_mtime_ns // 10**9 * 10**9
    got = (node.mode, node.uid, node.gid, node.rdev, node.mtime_ns)
    want = (want_mode, st.st_uid, st.st_gid, rdev, mtime)
    if got != want:
        out.append(f"{rel!r}: (mode, uid, gid, rdev, mtime) {got} != {want}")
    if dict(node.xattrs) != _xattrs(full):
        out.append(f"{rel!r}: extended attributes differ")
    if stat.S_ISLNK(st.st_mode) and node.target != os.readlink(full):
        out.append(f"{rel!r}: symlink target differs")
    if stat.S_ISREG(st.st_mode):
        with open(full, "rb") as f:
            want_hash = hashlib.sha256(f.read()).digest()
        if hashlib.sha256(img.read_range(node, 0, st.st_size)).digest() != want_hash:
            out.append(f"{rel!r}: content differs")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/incfs-debian"))
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    root = build_rootfs(args.work)
    print(f"rootfs {root} ready in {time.monotonic() - t:.1f} s")
    failed = False
    for label, make_src, options in (("directory", lambda: root, {}),
                                     ("GNU tar", lambda: _tar(root, args.work),
                                      {"device_links": False, "nanoseconds": True})):
        image = args.work / f"rootfs-{label.replace(' ', '-').lower()}.img"
        image.unlink(missing_ok=True)
        src = make_src()
        t = time.monotonic()
        stats = pack(src, image)
        elapsed = time.monotonic() - t
        with Image.open(image) as img:
            problems = compare(img, root, **options)
        print(f"{label}: {stats.files} files, {stats.directories} dirs, {stats.symlinks} "
              f"symlinks, {stats.devices} devices, {stats.hard_links} extra hard links, "
              f"{stats.with_xattrs} with xattrs; packed in {elapsed:.1f} s; "
              f"{len(problems)} differences")
        for p in problems[:30]:
            print("   ", p)
        failed |= bool(problems)
        if not args.keep:
            image.unlink(missing_ok=True)
    return 1 if failed else 0


def _tar(root: Path, work: Path) -> Path:
    archive = work / "rootfs.tar"
    if not archive.exists():
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=posix",
                        "--numeric-owner", "-C", str(root), "-cf", str(archive), "."],
                       check=False)
    return archive


if __name__ == "__main__":
    sys.exit(main())
