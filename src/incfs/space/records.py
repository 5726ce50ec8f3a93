"""The RELEASED record (type 8): data blocks that left a cache image.

    u32 count
    count x { u64 ino, u8 tree, u8 where, u16 reserved, u32 first, u32 n }   (20 bytes)

`tree` is always 0 (data: hash blocks are never released). `where` 0 GONE:
the blocks are absent from here on (fetched again when read). `where` 1
PLAIN: their bytes live in the file's plain copy (its passthrough file) at
their own offsets, verified against the Merkle tree on every read.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from ..errors import CorruptImage
from ..format.records import TreeKind

_RUN = struct.Struct("<QBBHII")
_COUNT = struct.Struct("<I")


class Where(enum.IntEnum):
    GONE = 0
    PLAIN = 1


class ReleasedRun(NamedTuple):
    ino: int
    first: int
    count: int
    where: Where = Where.GONE
    tree: TreeKind = TreeKind.DATA


def encode_released(runs: list[ReleasedRun]) -> bytes:
    out = bytearray(_COUNT.pack(len(runs)))
    for r in runs:
        out += _RUN.pack(r.ino, int(r.tree), int(r.where), 0, r.first, r.count)
    return bytes(out)


def decode_released(body: bytes) -> list[ReleasedRun]:
    if len(body) < _COUNT.size:
        raise CorruptImage("RELEASED record is cut short")
    (count,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + count * _RUN.size:
        raise CorruptImage("RELEASED record length does not match its count")
    runs = []
    for i in range(count):
        ino, tree, where, _reserved, first, n = _RUN.unpack_from(body, _COUNT.size + i * _RUN.size)
        if tree != TreeKind.DATA:
            raise CorruptImage(f"RELEASED names hash blocks of inode {ino} (never released)")
        if where not in (Where.GONE, Where.PLAIN):
            raise CorruptImage(f"RELEASED has unknown place {where}")
        runs.append(ReleasedRun(ino, first, n, Where(where)))
    return runs
