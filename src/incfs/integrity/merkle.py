"""Per-file Merkle trees, bit-compatible with fs-verity (SHA-256, 4 KiB, no salt).

The tree is stored the way fs-verity stores it: top level first, each level's
blocks in order, each block holding 128 SHA-256 hashes of the level below
(zero-padded). Level 0 hashes the data blocks; the root hash is the hash of
the single top block (or of the only data block; all zeros for an empty
file). The fs-verity *digest* hashes a 256-byte descriptor that holds the file
size and the root hash, so `digest()` equals what `fsverity digest` prints.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable, Iterable

from .. import BLOCK_SIZE

HASH_SIZE = 32
HASHES_PER_BLOCK = BLOCK_SIZE // HASH_SIZE  # 128
EMPTY_ROOT = bytes(HASH_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)


def block_count(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE


def hash_block(data: bytes) -> bytes:
    """SHA-256 of one block, zero-padded to 4096 bytes as fs-verity does."""
    if len(data) < BLOCK_SIZE:
        data = data + _ZERO_BLOCK[len(data):]
    return hashlib.sha256(data).digest()


class TreeGeometry:
    """Where each level of a file's tree lives among its hash blocks."""

    def __init__(self, size: int):
        self.size = size
        self.data_blocks = block_count(size)
        counts = []  # blocks per level, level 0 first
        n = self.data_blocks
        while n > 1:
            n = (n + HASHES_PER_BLOCK - 1) // HASHES_PER_BLOCK
            counts.append(n)
        self.level_counts = counts
        # storage index of the first block of each level (top level first)
        self.level_start = [0] * len(counts)
        pos = 0
        for level in reversed(range(len(counts))):
            self.level_start[level] = pos
            pos += counts[level]
        self.hash_blocks = pos

    @property
    def levels(self) -> int:
        return len(self.level_counts)

    def locate(self, level: int, index: int) -> tuple[int, int]:
        """The hash of block `index` of `level` (level -1 = data): which hash
        block holds it (storage index) and at which byte offset."""
        parent = level + 1
        return (self.level_start[parent] + index // HASHES_PER_BLOCK,
                (index % HASHES_PER_BLOCK) * HASH_SIZE)

    def leaf_of(self, data_index: int) -> int | None:
        """Storage index of the level-0 hash block that holds a data block's
        hash (None when the file has no hash blocks: one block or none)."""
        if not self.levels:
            return None
        return self.locate(-1, data_index)[0]

    def leaf_group(self, storage_index: int) -> range:
        """The data blocks whose hashes a level-0 hash block holds."""
        level, index = self.level_of(storage_index)
        if level != 0:
            raise ValueError(f"hash block {storage_index} is not a leaf (level {level})")
        first = index * HASHES_PER_BLOCK
        return range(first, min(first + HASHES_PER_BLOCK, self.data_blocks))

    def level_of(self, storage_index: int) -> tuple[int, int]:
        """(level, index within level) of a stored hash block."""
        for level in range(self.levels):
            start = self.level_start[level]
            if start <= storage_index < start + self.level_counts[level]:
                return level, storage_index - start
        raise IndexError(f"hash block {storage_index} out of range")


def build_tree(data_hashes: Iterable[bytes], size: int) -> tuple[bytes, list[bytes]]:
    """From the hashes of every data block, build (root_hash, hash blocks in
    storage order)."""
    geo = TreeGeometry(size)
    if geo.data_blocks == 0:
        return EMPTY_ROOT, []
    level_hashes = list(data_hashes)
    if geo.data_blocks == 1:
        return level_hashes[0], []
    levels: list[list[bytes]] = []
    while len(level_hashes) > 1:
        blocks = [_pack_hashes(level_hashes[i:i + HASHES_PER_BLOCK])
                  for i in range(0, len(level_hashes), HASHES_PER_BLOCK)]
        levels.append(blocks)
        level_hashes = [hashlib.sha256(b).digest() for b in blocks]
    stored = [b for blocks in reversed(levels) for b in blocks]
    return level_hashes[0], stored


def _pack_hashes(hashes: list[bytes]) -> bytes:
    return b"".join(hashes).ljust(BLOCK_SIZE, b"\0")


def leaf_block(data_hashes: list[bytes]) -> bytes:
    """The level-0 hash block of a group of (at most 128) data block hashes."""
    if len(data_hashes) > HASHES_PER_BLOCK:
        raise ValueError(f"{len(data_hashes)} hashes do not fit in one hash block")
    return _pack_hashes(data_hashes)


def tree_of_bytes(data: bytes) -> tuple[bytes, list[bytes]]:
    """Convenience for small inputs and tests: the tree of an in-memory file."""
    hashes = (hash_block(data[i:i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE))
    return build_tree(hashes, len(data))


def descriptor(root_hash: bytes, size: int) -> bytes:
    """The 256-byte fs-verity descriptor (version 1, SHA-256, 4 KiB, no salt)."""
    head = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, size)
    return (head + root_hash.ljust(64, b"\0") + bytes(32) + bytes(144))


def digest(root_hash: bytes, size: int) -> bytes:
    """The fs-verity file digest: SHA-256 of the descriptor."""
    return hashlib.sha256(descriptor(root_hash, size)).digest()


# A getter for verified hash blocks: storage index -> 4096 bytes, or None when
# the block is not present yet.
HashBlockGetter = Callable[[int], "bytes | None"]


class MissingHashBlock(Exception):
    """Verification needs a hash block that is not present yet."""

    def __init__(self, storage_index: int):
        super().__init__(f"hash block {storage_index} is not present")
        self.storage_index = storage_index


def expected_hash(geo: TreeGeometry, root_hash: bytes, level: int, index: int,
                  get_hash_block: HashBlockGetter) -> bytes:
    """The hash that block `index` of `level` (-1 = data) must have, read from
    its parent hash block (which the getter returns only once verified)."""
    if level + 1 >= geo.levels:
        return root_hash
    storage, offset = geo.locate(level, index)
    parent = get_hash_block(storage)
    if parent is None:
        raise MissingHashBlock(storage)
    return bytes(parent[offset:offset + HASH_SIZE])


def required_hash_blocks(geo: TreeGeometry, data_index: int) -> list[int]:
    """Storage indexes of the hash blocks on the path from a data block to the
    root, top first: what a loader must supply to verify that block."""
    path = []
    index, level = data_index, -1
    while level + 1 < geo.levels:
        storage, _ = geo.locate(level, index)
        path.append(storage)
        index //= HASHES_PER_BLOCK
        level += 1
    return list(reversed(path))
