"""Per-block compression: none, LZ4 or zstd, chosen block by block.

A block that does not shrink is stored raw and an all-zero block is stored as
no bytes at all, so the codec returns the kind it actually used.
"""

from __future__ import annotations

import threading

import lz4.block
import zstandard

from . import BLOCK_SIZE
from .errors import CorruptImage
from .format.records import BlockKind

COMPRESSIONS = {"none": BlockKind.RAW, "lz4": BlockKind.LZ4, "zstd": BlockKind.ZSTD}
_ZERO = bytes(BLOCK_SIZE)
# python-zstandard (de)compressor objects must not be used by two threads at
# once (reads run in worker threads: a shared one segfaults): one per thread.
_zstd = threading.local()


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_zstd, "c", None)
    if c is None:
        c = _zstd.c = zstandard.ZstdCompressor(level=3, write_content_size=False,
                                               write_checksum=False)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_zstd, "d", None)
    if d is None:
        d = _zstd.d = zstandard.ZstdDecompressor()
    return d


def is_zero(block: bytes) -> bool:
    return block == _ZERO[: len(block)]


def compress(block: bytes, kind: BlockKind) -> tuple[BlockKind, bytes]:
    """Encode one block (at most 4096 bytes) as `kind`, falling back to raw
    when compression does not save at least a little space."""
    if is_zero(block):
        return BlockKind.ZERO, b""
    if kind is BlockKind.LZ4:
        packed = lz4.block.compress(block, store_size=False)
    elif kind is BlockKind.ZSTD:
        packed = _zstd_c().compress(block)
    else:
        return BlockKind.RAW, block
    if len(packed) >= len(block):
        return BlockKind.RAW, block
    return kind, packed


def decompress(kind: BlockKind, stored: bytes, size: int) -> bytes:
    """Decode a stored block whose plain size is `size`.

    The output is bounded by `size` (never more than one block), so a hostile
    block cannot expand past 4 KiB.
    """
    try:
        if kind is BlockKind.RAW:
            out = stored
        elif kind is BlockKind.ZERO:
            return _ZERO[:size]
        elif kind is BlockKind.LZ4:
            out = lz4.block.decompress(stored, uncompressed_size=size)
        else:
            # python-zstandard ignores max_output_size when the frame header
            # declares a content size and allocates (then fills) that much:
            # a 4 KiB frame can claim 2^40 bytes (MemoryError) or really
            # expand to ~128 MiB. Refuse any declared size but the block's.
            declared = zstandard.get_frame_parameters(stored).content_size
            if declared not in (size, zstandard.CONTENTSIZE_UNKNOWN):
                raise CorruptImage(f"block decodes to {declared} bytes, expected {size}")
            out = _zstd_d().decompress(stored, max_output_size=size)
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise CorruptImage(f"compressed block does not decode: {e}") from None
    if len(out) != size:
        raise CorruptImage(f"block decodes to {len(out)} bytes, expected {size}")
    return out
