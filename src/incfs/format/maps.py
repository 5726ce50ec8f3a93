"""Block maps of the compact index (format 1.2): where each block of a file is.

Two layouts, chosen for the whole index by the incompatible feature bit
MAP_KINDS (docs/format.md, "Block map"):

* Without it, a map is three columns of `n` entries, offset (8), info (2) and
  CRC32 (4): 14 bytes a block. A 256 MiB image has ~0.9 MB of them, which a
  lazy mount fetches before its tree is visible.
* With it (what `incfs pack` writes), a map that has blocks starts with a
  head word, `base | kind << 56`, and the kind says what follows:

  - FULL: the three columns, as without the feature (any placement; the
    only kind for a file without a hash tree, whose CRCs are its check);
  - RUN: the info column only; the stored blocks lie back to back from
    `base` under the payload's placement rule, so their offsets follow from
    their sizes: 2 bytes a block;
  - RAW: nothing more; every block is raw, full-sized but for a data map's
    last (the file's size says how long), back to back from `base`.

  RUN and RAW carry no CRCs: they are allowed only for a file with a hash
  tree, where each block is checked against its SHA-256 before it is used,
  which the CRC would only repeat.

This module only encodes and decodes the bytes; `format.index` finds a map
and `index_ns` checks what the offsets point at.
"""

from __future__ import annotations

import enum
import struct
from array import array

from .. import BLOCK_SIZE
from .records import BlockKind, block_info

INCOMPAT_MAP_KINDS = 1
HOLE = 0xFFFF  # the info word of a block that is not stored (blockmap.ABSENT)
ALIGN = 8
HEAD_SIZE = 8
_KIND_SHIFT = 56
BASE_LIMIT = 1 << _KIND_SHIFT  # offsets up to 64 PiB
_HEAD = struct.Struct("<Q")
_FULL_RAW = block_info(BlockKind.RAW, BLOCK_SIZE)

# offsets, infos, crcs (None: the map has none, a hash tree checks the blocks)
Columns = tuple[array, array, "array | None"]


class MapKind(enum.IntEnum):
    FULL = 0
    RUN = 1
    RAW = 2


class MapDamage(ValueError):
    """A map's bytes cannot be a map; the caller names the file."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def columns_size(blocks: int) -> int:
    """A map without the feature: the three columns, padded."""
    return _aligned(14 * blocks)


def map_size(kind: MapKind, blocks: int) -> int:
    """A map with the feature: nothing for no blocks, else head and body."""
    if not blocks:
        return 0
    if kind is MapKind.FULL:
        return HEAD_SIZE + columns_size(blocks)
    if kind is MapKind.RUN:
        return HEAD_SIZE + _aligned(2 * blocks)
    return HEAD_SIZE


# --- writing --------------------------------------------------------------------

def encode_columns(offsets, infos, crcs) -> bytes:
    blob = (array("Q", offsets).tobytes() + array("H", infos).tobytes()
            + array("I", crcs).tobytes())
    return blob + bytes(_aligned(len(blob)) - len(blob))


def encode_map(kind: MapKind, base: int, offsets, infos, crcs) -> bytes:
    """A map with the feature; `base` is the first stored block's offset
    (RUN, RAW), ignored for FULL."""
    if not len(infos):
        return b""
    if kind is MapKind.FULL:
        return _HEAD.pack(0) + encode_columns(offsets, infos, crcs)
    if not 0 <= base < BASE_LIMIT:
        raise ValueError("block offset beyond what a map head holds")
    head = _HEAD.pack(base | kind << _KIND_SHIFT)
    if kind is MapKind.RAW:
        return head
    blob = array("H", infos).tobytes()
    return head + blob + bytes(_aligned(len(blob)) - len(blob))


def choose_kind(infos, offsets, last_size: int, has_tree: bool) -> MapKind:
    """The smallest kind that gives back exactly these blocks: `offsets` are
    where each stored block lies (any one origin), `last_size` the plain
    size of the map's last block."""
    stored = [i for i, info in enumerate(infos) if info >> 14 != BlockKind.ZERO]
    if not has_tree:
        return MapKind.FULL
    if stored:
        derived = run_offsets(offsets[stored[0]], array("H", infos))
        if any(derived[i] != offsets[i] for i in stored):
            return MapKind.FULL
    last = block_info(BlockKind.RAW, last_size)
    if len(stored) == len(infos) and infos[-1] == last and all(
            info == _FULL_RAW for info in infos[:-1]):
        return MapKind.RAW
    return MapKind.RUN


# --- reading --------------------------------------------------------------------

def decode_columns(view, at: int, n: int) -> Columns:
    offsets = array("Q", view[at:at + 8 * n])
    infos = array("H", view[at + 8 * n:at + 10 * n])
    crcs = array("I", view[at + 10 * n:at + 14 * n])
    return offsets, infos, crcs


def decode_map(view, at: int, room: int, n: int, last_size: int,
               data_end: int) -> tuple[Columns, int]:
    """The map of `n` blocks at `at` (with the feature), reading at most
    `room` bytes; returns its columns and its size in bytes. A RAW map's
    blocks must end by `data_end`: its 8 bytes could otherwise claim four
    billion blocks, and the columns built for them would take 60 GB."""
    if not n:
        return (array("Q"), array("H"), array("I")), 0
    kind, base, size = map_head(view, at, room, n)
    body = at + HEAD_SIZE
    if kind is MapKind.FULL:
        if base:
            raise MapDamage("its block map has a base but lists every offset")
        return decode_columns(view, body, n), size
    if kind is MapKind.RAW:
        if base + BLOCK_SIZE * (n - 1) + last_size > data_end:
            raise MapDamage("its blocks point outside the image's data")
        infos = array("H", [_FULL_RAW]) * n
        infos[-1] = block_info(BlockKind.RAW, last_size)
        offsets = array("Q", range(base, base + BLOCK_SIZE * n, BLOCK_SIZE))
        return (offsets, infos, None), size
    infos = array("H", view[body:body + 2 * n])
    return (run_offsets(base, infos), infos, None), size


def map_head(view, at: int, room: int, n: int) -> tuple[MapKind, int, int]:
    """(kind, base, size in bytes) of the map of `n` > 0 blocks at `at`
    (with the feature), reading its head only and at most `room` bytes."""
    if room < HEAD_SIZE:
        raise MapDamage("its block map lies outside the index")
    (head,) = _HEAD.unpack_from(view, at)
    raw_kind, base = head >> _KIND_SHIFT, head & (BASE_LIMIT - 1)
    if raw_kind not in MapKind._value2member_map_:
        raise MapDamage(f"its block map is of unknown kind {raw_kind}")
    kind = MapKind(raw_kind)
    size = map_size(kind, n)
    if size > room:
        raise MapDamage("its block map lies outside the index")
    return kind, base, size


def run_offsets(base: int, infos: array) -> array:
    """Where each block of a RUN map lies: stored blocks back to back from
    `base` under the placement rule; holes and zero blocks at 0. An info
    word the rule cannot place (a stored size over 4096) is left for the
    map's checks; it is given 0 and moves nothing. The rule is
    `records.place_block`'s, on plain ints (this runs once a block)."""
    offsets = array("Q", bytes(8 * len(infos)))
    cursor = base
    for i, info in enumerate(infos):
        kind = info >> 14
        if info == HOLE or kind == BlockKind.ZERO or info & 0x2000:
            continue
        size = info & 0x1FFF
        if kind == BlockKind.RAW and size == BLOCK_SIZE:
            cursor = (cursor + BLOCK_SIZE - 1) & ~(BLOCK_SIZE - 1)
        offsets[i] = cursor
        cursor += size
    return offsets
