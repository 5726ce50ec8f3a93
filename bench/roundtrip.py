"""What one round trip to the daemon costs: open, Python's isatty ioctl
(TCGETS) and close of a cached file, and a getxattr of an absent attribute,
on a file of the tree and on the same file in an incfs mount of it.

    python bench/roundtrip.py TREE_FILE MOUNT_FILE [--count N]

These are the requests the kernel cannot keep from the daemon (no negative
cache for IOCTL or GETXATTR; OPEN and RELEASE even in passthrough): they set
the gap on `python import` and `ls -l` second passes.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import termios
import time


def open_ioctl_close(path: str, count: int) -> float:
    t = time.perf_counter()
    for _ in range(count):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, termios.TCGETS, bytes(64))
        except OSError:
            pass  # ENOTTY: what isatty() learns
        os.close(fd)
    return (time.perf_counter() - t) / count


def absent_xattr(path: str, count: int) -> float:
    t = time.perf_counter()
    for _ in range(count):
        try:
            os.getxattr(path, "security.selinux")
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
    return (time.perf_counter() - t) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("native")
    ap.add_argument("mounted")
    ap.add_argument("--count", type=int, default=5000)
    args = ap.parse_args()
    for label, case in (("open + ioctl + close", open_ioctl_close),
                        ("getxattr (absent)", absent_xattr)):
        native, mounted = case(args.native, args.count), case(args.mounted, args.count)
        print(f"{label}: native {native * 1e6:.1f} us, incfs {mounted * 1e6:.1f} us "
              f"({native / mounted:.2f} of native)")


if __name__ == "__main__":
    main()
