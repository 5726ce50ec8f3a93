"""Reading an image's blocks, verified: the hot path of every FUSE read.

`VerifiedReads` is the reading half of `Image` (image.py holds opening,
replay, changes and fills): a data block is checked against its file's
Merkle tree (level-0 hash blocks, themselves verified up to the signed
root, kept in a small cache) or, without a tree, against its CRC, before
its bytes leave here. Raw runs stored back to back are read with one pread
and checked with one comparison per hash block.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import NoReturn

from . import BLOCK_SIZE, codec
from .blockmap import ABSENT
from .errors import BadBlock, CorruptImage
from .format.records import BlockKind, TreeKind, info_kind, info_size
from .integrity import merkle
from .namespace import Inode
from .space.plainfiles import is_plain

HASH_CACHE_BLOCKS = 4096  # verified hash blocks kept in memory (16 MiB)
# How often a read starts again when a block it read moved meanwhile. A
# block moves at most twice (out of the image into its file's plain copy,
# then out of the map if that copy is dropped), so a third failure at an
# unchanged place is a bad block.
READ_ATTEMPTS = 3


class MissingBlock(Exception):
    """A read needs a block (data or hash) that is not present yet."""

    def __init__(self, ino: int, tree: TreeKind, index: int):
        super().__init__(f"inode {ino} {tree.name.lower()} block {index} is absent")
        self.ino, self.tree, self.index = ino, tree, index


class _Moved(Exception):
    """A block that failed, read from one place, is now mapped at another (or
    nowhere): read it again. Raised only inside `read_range`, which makes it
    a BadBlock once the reads run out."""

    def __init__(self, ino: int, index: int, why: str):
        super().__init__(why)
        self.ino, self.index, self.why = ino, index, why


class VerifiedReads:
    """Mixed into Image, which provides fd, plain, counters, _hash_lock and
    _hash_cache."""

    def read_block(self, node: Inode, index: int) -> bytes:
        """The plain bytes of data block `index`, verified. Raises
        MissingBlock when it (or a hash block needed for it) is absent and
        IntegrityError when the stored bytes are wrong."""
        loc = node.data.get(index)
        if loc is None:
            raise MissingBlock(node.ino, TreeKind.DATA, index)
        plain = self._load(node, TreeKind.DATA, index, loc, plain_size(node, index))
        if node.has_tree:
            self._check_data_hash(node, index, plain)
        return plain

    def _load(self, node: Inode, tree: TreeKind, index: int, loc, size: int) -> bytes:
        offset, info, crc = loc
        kind = info_kind(info)
        if kind is BlockKind.ZERO:
            return bytes(size)
        stored = self.stored_bytes(node, offset, info_size(info))
        # a block in a plain copy, or in a map without CRCs, has none: the
        # caller's Merkle check covers it (both exist only for files with a
        # hash tree)
        if crc is not None and not is_plain(offset) and zlib.crc32(stored) != crc:
            self.counters["verify_failures"] += 1
            raise BadBlock(node.ino, tree, index, f"inode {node.ino} {tree.name.lower()} "
                           f"block {index}: stored bytes fail their checksum")
        try:
            return codec.decompress(kind, stored, size)
        except CorruptImage as e:
            self.counters["verify_failures"] += 1
            raise BadBlock(node.ino, tree, index, f"inode {node.ino} block {index}: {e}") from None

    def stored_bytes(self, node: Inode, offset: int, length: int) -> bytes:
        """Stored bytes at a block map's offset: in the image, or in the
        file's plain copy (incfs.space.plainfiles)."""
        if is_plain(offset):
            return self.plain.pread(node, length, offset)
        return os.pread(self.fd, length, offset)

    def _check_data_hash(self, node: Inode, index: int, plain: bytes) -> None:
        want = self._expected(node, -1, index)
        if merkle.hash_block(plain) != want:
            self.counters["verify_failures"] += 1
            raise BadBlock(node.ino, TreeKind.DATA, index,
                           f"inode {node.ino} data block {index} fails verification")

    def _expected(self, node: Inode, level: int, index: int) -> bytes:
        try:
            return merkle.expected_hash(node.geometry, node.root_hash, level, index,
                                        lambda s: self.hash_block(node, s))
        except merkle.MissingHashBlock as e:
            raise MissingBlock(node.ino, TreeKind.HASH, e.storage_index) from None

    def hash_block(self, node: Inode, storage_index: int) -> bytes | None:
        """A verified hash block, or None if absent (IntegrityError if bad)."""
        key = (node.ino, storage_index)
        with self._hash_lock:
            cached = self._hash_cache.get(key)
            if cached is not None:
                self._hash_cache.move_to_end(key)
                return cached
        loc = node.hashes.get(storage_index)
        if loc is None:
            return None
        plain = self._load(node, TreeKind.HASH, storage_index, loc, BLOCK_SIZE)
        level, index = node.geometry.level_of(storage_index)
        if hashlib.sha256(plain).digest() != self._expected(node, level, index):
            self.counters["verify_failures"] += 1
            raise BadBlock(node.ino, TreeKind.HASH, storage_index,
                           f"inode {node.ino} hash block {storage_index} fails verification")
        self._remember_hash_block(key, plain)
        return plain

    def _remember_hash_block(self, key: tuple[int, int], plain: bytes) -> None:
        with self._hash_lock:
            self._hash_cache[key] = plain
            if len(self._hash_cache) > HASH_CACHE_BLOCKS:
                self._hash_cache.popitem(last=False)

    def read_range(self, node: Inode, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a file whose blocks are present.

        The hot path of every FUSE read: one pread per contiguous stored
        extent, the level-0 hash block looked up once per 128 blocks, and no
        CRC where the Merkle check (stronger) applies."""
        end = min(node.size, offset + length)
        if offset >= end:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        parts = self._read_moving(node, first, last + 1)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        skip = offset - first * BLOCK_SIZE
        if skip == 0 and len(data) == end - offset:
            return data  # no copy: a whole-block read of one extent
        return data[skip:skip + end - offset]

    def _read_moving(self, node: Inode, start: int, stop: int) -> list[bytes]:
        """`_read_blocks`, read again while a block moves under it.

        Reads take no lock: a fill publishes a block only once its bytes are
        written, and a block never changes in place. But a block can move
        while a read holds its old place. `incfs.space.release` gives a
        complete file's blocks up to its plain copy (or, under the cache cap,
        up altogether) and then punches their old bytes. A read that looked
        the place up before the move and read it after the punch gets zeros.
        Those are not bad blocks: counted as verify failures they were
        "repaired", fetched again over the network (or, offline, failed),
        though the plain copy held the right bytes all along. So a block that
        fails is looked up again: if the map now says another place, or
        none, the read starts over (and waits for a fetch if it is gone)."""
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return self._read_blocks(node, start, stop)
            except _Moved:
                continue
        try:
            return self._read_blocks(node, start, stop)
        except _Moved as e:
            self.counters["verify_failures"] += 1
            raise BadBlock(e.ino, TreeKind.DATA, e.index, e.why) from None

    def _read_blocks(self, node: Inode, start: int, stop: int) -> list[bytes]:
        offsets, infos, crcs = node.data.arrays()
        if infos is None:
            raise MissingBlock(node.ino, TreeKind.DATA, start)
        out: list[bytes] = []
        checker = _HashChecker(self, node) if node.has_tree else None
        i = start
        while i < stop:
            info = infos[i]
            if info == ABSENT:
                raise MissingBlock(node.ino, TreeKind.DATA, i)
            if info >> 14 == BlockKind.ZERO:
                out.append(self._checked(node, i, bytes(plain_size(node, i)), checker,
                                         (offsets[i], info)))
                i += 1
                continue
            # the run's info words, read once: the arrays are live, and a
            # block moved meanwhile must not change a size mid-run
            base, run = offsets[i], [info]
            total = info & 0x1FFF
            j = i + 1
            while j < stop and offsets[j] == base + total:
                word = infos[j]
                if word == ABSENT or word >> 14 == BlockKind.ZERO:
                    break
                run.append(word)
                total += word & 0x1FFF
                j += 1
            raw = self.stored_bytes(node, base, total)
            if len(raw) != total:
                self._refuse(node, i, (base, info),
                             f"inode {node.ino}: stored data cut short at block {i}")
            if checker is not None and _plain_run(node, run, j):
                # the common case: raw blocks, stored back to back: verify
                # them in bulk and hand the extent on as it was read
                bad = checker.first_mismatch(i, j, raw)
                if bad is not None:
                    self._refuse(node, bad, (base + (bad - i) * BLOCK_SIZE, run[bad - i]),
                                 f"inode {node.ino} data block {bad} fails verification")
                out.append(raw)
                i = j
                continue
            extent = memoryview(raw)
            pos = 0
            for k, word in enumerate(run, i):
                size = word & 0x1FFF
                stored, used = extent[pos:pos + size], (base + pos, word)
                pos += size
                if checker is None and zlib.crc32(stored) != crcs[k]:
                    self._refuse(node, k, used, f"inode {node.ino} data block "
                                 f"{k}: stored bytes fail their checksum")
                out.append(self._checked(node, k, self._decode(node, k, word, stored, used),
                                         checker, used))
            i = j
        return out

    def _refuse(self, node: Inode, index: int, used: tuple[int, int], why: str) -> NoReturn:
        """Data block `index`, read at `used` (offset, info word), failed:
        _Moved if the map now has it elsewhere or nowhere (see
        `_read_moving`), else it is bad (counted, BadBlock)."""
        now = node.data.get(index)
        if now is None or now[:2] != used:
            raise _Moved(node.ino, index, why)
        self.counters["verify_failures"] += 1
        raise BadBlock(node.ino, TreeKind.DATA, index, why)

    def _decode(self, node: Inode, index: int, info: int, stored,
                used: tuple[int, int]) -> bytes:
        kind = info >> 14
        size = plain_size(node, index)
        if kind == BlockKind.RAW and len(stored) == size:
            return bytes(stored)
        try:
            return codec.decompress(BlockKind(kind), stored, size)
        except CorruptImage as e:
            self._refuse(node, index, used, f"inode {node.ino} block {index}: {e}")

    def _checked(self, node: Inode, index: int, plain: bytes, checker,
                 used: tuple[int, int]) -> bytes:
        if checker is not None and not checker.matches(index, plain):
            self._refuse(node, index, used,
                         f"inode {node.ino} data block {index} fails verification")
        return plain

    def missing_for_read(self, node: Inode, offset: int, length: int) -> list[tuple[TreeKind, int]]:
        """Every block (data, and hash blocks on the way to the root) that a
        read of this range still needs."""
        end = min(node.size, offset + length)
        if offset >= end or node.data is None or node.complete:
            return []
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        need = [(TreeKind.DATA, i) for i in node.data.missing(first, last + 1)]
        if node.hashes is not None and node.hashes.present < node.hashes.count:
            wanted: set[int] = set()
            for i in range(first, last + 1, merkle.HASHES_PER_BLOCK):
                wanted.update(merkle.required_hash_blocks(node.geometry, i))
            wanted.update(merkle.required_hash_blocks(node.geometry, last))
            need.extend((TreeKind.HASH, s) for s in sorted(wanted)
                        if not node.hashes.is_present(s))
        return need


class _HashChecker:
    """Checks consecutive data blocks of one file against level 0 of its
    tree, fetching each (verified) hash block once."""

    __slots__ = ("image", "node", "storage", "hashes")

    def __init__(self, image: VerifiedReads, node: Inode):
        self.image, self.node = image, node
        self.storage = -1
        self.hashes: bytes = b""

    def matches(self, index: int, plain: bytes) -> bool:
        geo = self.node.geometry
        if geo.levels == 0:
            return merkle.hash_block(plain) == self.node.root_hash
        storage, offset = geo.locate(-1, index)
        if storage != self.storage:
            block = self.image.hash_block(self.node, storage)
            if block is None:
                raise MissingBlock(self.node.ino, TreeKind.HASH, storage)
            self.storage, self.hashes = storage, block
        return merkle.hash_block(plain) == self.hashes[offset:offset + merkle.HASH_SIZE]

    def first_mismatch(self, start: int, stop: int, data: bytes) -> int | None:
        """Check whole blocks [start, stop) held back to back in `data`: one
        comparison per hash block instead of one per data block. Returns the
        first block that fails, or None."""
        if self.node.geometry.levels == 0:
            return None if self.matches(start, data) else start
        view = memoryview(data)
        index, pos = start, 0
        while index < stop:
            storage, offset = self.node.geometry.locate(-1, index)
            if storage != self.storage:
                block = self.image.hash_block(self.node, storage)
                if block is None:
                    raise MissingBlock(self.node.ino, TreeKind.HASH, storage)
                self.storage, self.hashes = storage, block
            count = min(stop - index, (BLOCK_SIZE - offset) // merkle.HASH_SIZE)
            got = b"".join([hashlib.sha256(view[p:p + BLOCK_SIZE]).digest()
                            for p in range(pos, pos + count * BLOCK_SIZE, BLOCK_SIZE)])
            if got != self.hashes[offset:offset + count * merkle.HASH_SIZE]:
                for k in range(count):
                    if got[k * 32:(k + 1) * 32] != self.hashes[offset + k * 32:offset + (k + 1) * 32]:
                        return index + k
            index += count
            pos += count * BLOCK_SIZE
        return None


def _plain_run(node: Inode, run: list[int], stop: int) -> bool:
    """The run's blocks (info words `run`, ending before block `stop`) are all
    raw and whole (stored = plain bytes), and the last is not a partial
    final block (which hashes zero-padded)."""
    if stop * BLOCK_SIZE > node.size:
        return False
    full_raw = (int(BlockKind.RAW) << 14) | BLOCK_SIZE
    return all(word == full_raw for word in run)


def plain_size(node: Inode, index: int) -> int:
    return min(BLOCK_SIZE, node.size - index * BLOCK_SIZE)
