"""fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): give a byte range
of an image back to the file system. Offsets never move, so the records
around the hole keep their back links; what reads a punched block reads
zeros, which fail the block's CRC and Merkle checks (never served)."""

from __future__ import annotations

import ctypes
import os

from .. import BLOCK_SIZE

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

# dlopen(NULL): the process's own symbols, libc among them. find_library("c")
# would run `ldconfig -p` in a subprocess at every daemon start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch(fd: int, offset: int, length: int) -> int:
    """Punch the whole 4 KiB pages inside [offset, offset+length); returns
    the bytes of those pages. Partial pages at the ends are left alone: they
    may hold live neighbours (tightly packed compressed blocks, records)."""
    start = -(-offset // BLOCK_SIZE) * BLOCK_SIZE
    end = (offset + length) // BLOCK_SIZE * BLOCK_SIZE
    if end <= start:
        return 0
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, start, end - start) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot punch a hole in the image: {os.strerror(err)}")
    return end - start


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted and joined where they touch."""
    out: list[list[int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


def allocated(fd: int) -> int:
    """Bytes the file system has allocated to the file (st_blocks * 512)."""
    return os.fstat(fd).st_blocks * 512
