"""A tree of many small files for scale tests and benchmarks: DIRS
directories of 1,000 files each, every hundredth file holding one line, the
rest empty (the shape of a dataset or a node_modules, metadata-bound).

    python -m incfs.testing.smalltree ROOT DIRS

Run as its own process by the tests and benches that measure pack or mount,
so the memory spent creating the tree is not counted against them.
"""

from __future__ import annotations

import os
import sys

FILES_PER_DIR = 1000


def make_tree(root: str, dirs: int) -> None:
    os.makedirs(root, exist_ok=True)
    for d in range(dirs):
        path = os.path.join(root, "d%03d" % d)
        os.mkdir(path)
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(FILES_PER_DIR):
                fd = os.open("f%03d" % i, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
                if i % 100 == 0:
                    os.write(fd, b"file %d/%d\n" % (d, i))
                os.close(fd)
        finally:
            os.close(dfd)


if __name__ == "__main__":
    make_tree(sys.argv[1], int(sys.argv[2]))
