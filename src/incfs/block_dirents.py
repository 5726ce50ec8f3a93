"""A directory's name block (docs/format.md) encoded straight as the
fuse_dirent records READDIR answers with (incfs.fuse.dirents).

A cold walk of many directories lists each once, and in Python the listing
of a 1,000-name directory costs ~200 µs (an object per name, a struct
format of five fields per entry): most of what such a walk costs the
daemon. `encode` is one pass over the block in C when the extension
`incfs._block_dirents` was built (`make setup`; ~10 µs), else the same in
Python; both give the same bytes, or both None (tests/test_block_dirents.py).
INCFS_NO_NATIVE=1 in the environment leaves the C one unused.

`encode` is a fast path with a screen, not the checks: it takes the block
as `encode_names` writes it (names back to back after the table, strictly
ascending, none empty, ".", ".." or holding "/" or NUL, children in a
range) and answers None for anything else, and the caller then decodes the
block name by name (IndexNamespace), which lists a valid block in another
layout and raises the damage a bad one has.
"""

from __future__ import annotations

import operator
import os
import struct
from array import array
from itertools import accumulate, islice
from typing import Callable

from .fuse.dirents import encode_records

TABLE_ENTRY = 16  # a name block's entry: name_off u32, name_len u8, d_type u8, 2 reserved, child u64
_NAME_FORMATS = tuple(f"{n}s" for n in range(256))

Encoded = tuple[bytes, array]  # the records, and where each starts (then the end) in 8-byte units


def encode_py(block: memoryview, count: int, types: bytes, low: int,
              high: int) -> tuple[bytes, bytes] | None:
    """The Python `encode`: (records, ends as native u32 bytes) or None."""
    if count < 0 or len(types) != count:
        raise ValueError("one type per entry")
    block = memoryview(block)
    table = block[:count * TABLE_ENTRY]
    if len(table) != count * TABLE_ENTRY:
        return None
    lengths = bytes(table[4::TABLE_ENTRY])
    starts = array("I", accumulate(lengths, initial=count * TABLE_ENTRY))
    if table.cast("I")[0::4].tobytes() != memoryview(starts)[:-1].tobytes():
        return None  # not back to back in entry order
    if starts[-1] > len(block):
        return None
    names = struct.unpack(lengths.decode("latin-1").translate(_NAME_FORMATS),
                          block[starts[0]:starts[-1]])
    children = table.cast("Q")[1::2].tolist()
    if (maybe_bad_names(names, lengths) or not strictly_ascending(names)
            or (children and not (low <= min(children) and max(children) <= high))):
        return None
    data, ends = encode_records(names, children, types, lengths)
    return data, ends.tobytes()


def maybe_bad_names(names: tuple[bytes, ...], lengths: bytes) -> bool:
    """Whether a name may be bad (empty, ".", "..", a "/" or NUL in it):
    whole-block operations, no loop per name; check_name says which."""
    joined = b"".join(names)
    return b"/" in joined or b"\0" in joined or 0 in lengths or _has_dot_names(names, lengths)


def _has_dot_names(names: tuple[bytes, ...], lengths: bytes) -> bool:
    """Whether "." or ".." is among `names`: only names of 1 or 2 bytes are
    looked at (found in `lengths`, one byte per name, by bytes.find)."""
    for length in (1, 2):
        at = lengths.find(length)
        while at >= 0:
            if names[at] in (b".", b".."):
                return True
            at = lengths.find(length, at + 1)
    return False


def strictly_ascending(names: tuple[bytes, ...]) -> bool:
    return all(map(operator.lt, names, islice(names, 1, None)))


def _native() -> Callable | None:
    if os.environ.get("INCFS_NO_NATIVE"):
        return None
    try:
        from ._block_dirents import encode as native
    except ImportError:  # not built (no compiler at setup): Python does it
        return None
    return native


NATIVE = _native()
_encode = NATIVE or encode_py


def encode(block: memoryview, count: int, types: bytes, low: int, high: int) -> Encoded | None:
    """The records of a name block's `count` entries with the d_types
    `types` (one byte each), or None (see the module doc). `block`: from
    the block's start to the end of the region its names may lie in;
    children must lie in [low, high]."""
    got = _encode(block, count, types, low, high)
    if got is None:
        return None
    ends = array("I")
    ends.frombytes(got[1])
    return got[0], ends
