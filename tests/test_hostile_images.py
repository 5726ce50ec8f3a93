"""Hostile images: crafted with the format modules, CRCs right, so only the
semantic checks can catch them. Every one must give a clean error -- an
IncfsError (or an OSError with an errno) with a one-line message -- when it
is opened or when it is read, without a traceback, a hang, or memory beyond a
fixed bound. A few go through a real FUSE mount too: the mount must refuse
them with a one-line IncfsError, or serve them and fail the bad reads with
EIO while staying up."""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import lz4.block
import pytest
import zstandard

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.errors import IncfsError, IntegrityError
from incfs.format import records as R
from incfs.format.layout import (LOG_START, RECORD_HEADER_SIZE, RecordHeader, RecordType,
                                 Superblock)
from incfs.format.log import LogAppender
from incfs.image import Image, MissingBlock
from incfs.integrity import merkle, signing

F = stat.S_IFREG | 0o444
D = stat.S_IFDIR | 0o555
MiB = 1 << 20
MEMORY_BOUND = 64 * MiB  # peak Python allocations while opening and reading one image
TIME_BOUND = 20.0


# --- crafting ------------------------------------------------------------------------

class Craft:
    """Appends records to a fresh image (root directory only) with correct
    CRCs and back links, plus raw writes for records that lie."""

    def __init__(self, path: Path):
        self.path = path
        self.img = Image.create(path)
        self.img.durable = False
        self.app: LogAppender = self.img.appender

    def inodes(self, *entries: R.InodeEntry) -> None:
        self.app.append(RecordType.INODES, R.encode_inodes(list(entries)))

    def inodes2(self, *entries: R.InodeEntry) -> None:
        self.app.append(RecordType.INODES2, R.encode_inodes2(list(entries)))

    def dirents(self, *links: tuple[int, int, int, bytes]) -> None:
        self.app.append(RecordType.DIRENTS, R.encode_dirents(
            [R.DirentEntry(R.DirentOp(op), parent, child, name) for op, parent, child, name in links]))

    def add(self, parent: int, child: int, name: bytes) -> None:
        self.dirents((R.DirentOp.ADD, parent, child, name))

    def file(self, ino: int, size: int, name: bytes | None = None, root: bytes | None = None,
             parent: int = ROOT_INO) -> None:
        flags = R.InodeFlags.HAS_TREE if root is not None else R.InodeFlags(0)
        self.inodes(R.InodeEntry(ino, F, size, root_hash=root or bytes(32), flags=flags))
        self.add(parent, ino, name if name is not None else b"f%d" % ino)

    def data(self, payload: bytes) -> int:
        """A DATA record; returns where its payload starts."""
        return self.app.write_data(payload)

    def blocks(self, *runs: R.BlockRun) -> None:
        self.app.append(RecordType.BLOCKS, R.encode_runs(list(runs)))

    def stored_block(self, ino: int, index: int, kind: R.BlockKind, stored: bytes,
                     tree: R.TreeKind = R.TreeKind.DATA) -> None:
        """Store bytes and map them, CRC right, whatever they decode to."""
        offset = self.data(stored) if kind is not R.BlockKind.RAW else self._raw_aligned(stored)
        self.blocks(R.BlockRun(ino, tree, index, offset,
                               [(R.block_info(kind, len(stored)), zlib.crc32(stored))]))

    def _raw_aligned(self, stored: bytes) -> int:
        self.app.pad_to_payload_alignment()
        return self.data(stored)

    def record(self, rtype: int, body: bytes, *, length: int | None = None,
               body_len: int | None = None, prev: int | None = None,
               payload: bytes = b"") -> None:
        """A record whose header may lie; its CRC is still right."""
        real = RECORD_HEADER_SIZE + len(body) + len(payload)
        header = RecordHeader(rtype, 0, length if length is not None else (real + 7) // 8 * 8,
                              self.app.last_record if prev is None else prev,
                              len(body) if body_len is None else body_len)
        blob = header.encode(body) + body + payload
        blob = blob.ljust((len(blob) + 7) // 8 * 8, b"\0")
        os.pwrite(self.app.fd, blob, self.app.end)
        self.app.last_record = self.app.end
        self.app.end += len(blob)

    def close(self) -> Path:
        self.img.close()
        return self.path


def _text_block(seed: int) -> bytes:
    return (b"hostile %d " % seed * 600)[:BLOCK_SIZE]


# --- the cases: (what they build, where the clean error must come) --------------------
# "open": Image.open refuses; "read": opens, a read fails cleanly (IncfsError);
# "dropped": opens, the lying record and what follows are dropped as a torn tail;
# "absent": opens, the bad mapping counts as an absent block; "ok": harmless.

CASES: dict[str, tuple] = {}


def case(stage: str):
    def register(fn):
        CASES[fn.__name__.removeprefix("h_")] = (fn, stage)
        return fn
    return register


@case("open")
def h_name_with_slash(c): c.file(2, 1, b"a/b")
@case("open")
def h_name_with_nul(c): c.file(2, 1, b"a\0b")
@case("open")
def h_name_dotdot(c): c.file(2, 1, b"..")
@case("open")
def h_name_dot(c): c.file(2, 1, b".")
@case("open")
def h_name_empty(c): c.file(2, 1, b"")


@case("open")
def h_name_over_255_bytes(c):
    # name_len is a u8: a longer name can only be a lie about the length
    c.inodes(R.InodeEntry(2, F, 1))
    name = b"n" * 300
    body = struct.pack("<I", 1) + struct.pack("<BBQQ", 1, 255, ROOT_INO, 2) + name
    c.record(RecordType.DIRENTS, body)


@case("open")
def h_directory_cycle(c):
    c.inodes(R.InodeEntry(2, D), R.InodeEntry(3, D))
    c.add(2, 3, b"b")  # b under a (a has no name yet)
    c.add(3, 2, b"a")  # a under b: a loop that never reaches the root


@case("open")
def h_directory_into_itself(c):
    c.inodes(R.InodeEntry(2, D))
    c.add(2, 2, b"self")


@case("open")
def h_root_into_a_directory(c):
    c.inodes(R.InodeEntry(2, D))
    c.add(ROOT_INO, 2, b"d")
    c.add(2, ROOT_INO, b"root")


@case("open")
def h_second_name_for_a_directory(c):
    c.inodes(R.InodeEntry(2, D))
    c.add(ROOT_INO, 2, b"a")
    c.add(ROOT_INO, 2, b"b")


@case("open")
def h_second_name_for_a_directory_deeper(c):
    c.inodes(R.InodeEntry(2, D), R.InodeEntry(3, D))
    c.add(ROOT_INO, 2, b"a")
    c.add(2, 3, b"b")
    c.add(3, 2, b"loop")


@case("open")
def h_name_for_a_missing_inode(c): c.add(ROOT_INO, 99, b"ghost")


@case("open")
def h_parent_is_a_file(c):
    c.file(2, 1)
    c.inodes(R.InodeEntry(3, F, 1))
    c.add(2, 3, b"under-a-file")


@case("open")
def h_remove_a_missing_name(c): c.dirents((R.DirentOp.REMOVE, ROOT_INO, 2, b"nothing"))


@case("open")
def h_remove_a_full_directory(c):
    c.inodes(R.InodeEntry(2, D), R.InodeEntry(3, F, 1))
    c.add(ROOT_INO, 2, b"d")
    c.add(2, 3, b"f")
    c.dirents((R.DirentOp.REMOVE, ROOT_INO, 2, b"d"))


@case("open")
def h_duplicate_inode(c): c.inodes(R.InodeEntry(2, F, 1), R.InodeEntry(2, D))
@case("open")
def h_inode_zero(c): c.inodes(R.InodeEntry(0, F, 1))
@case("open")
def h_inode_in_the_mounts_own_range(c): c.file(1 << 62, 10, b"status-lookalike")
@case("open")
def h_inode_number_max(c): c.file((1 << 64) - 1, 1, b"max")
@case("open")
def h_regular_file_with_a_target(c):
    c.inodes(R.InodeEntry(2, F, 1, target=b"x" * 100))  # would show st_size 100
    c.add(ROOT_INO, 2, b"t")


@case("open")
def h_directory_with_a_size(c): c.inodes(R.InodeEntry(2, D, 4096))
@case("open")
def h_device_node(c): c.inodes(R.InodeEntry(2, stat.S_IFCHR | 0o644, 0))


# --- INODES2 (format 1.1): owners, devices, extended attributes ---------------------
@case("open")
def h_fifo_in_a_1_0_record(c): c.inodes(R.InodeEntry(2, stat.S_IFIFO | 0o644))
@case("open")
def h_rdev_on_a_file(c): c.inodes2(R.InodeEntry(2, F, 0, rdev=259))
@case("open")
def h_unknown_file_type(c): c.inodes2(R.InodeEntry(2, 0o170000 | 0o644))
@case("open")
def h_xattrs_unsorted(c):
    c.inodes2(R.InodeEntry(2, F, xattrs=((b"user.b", b"1"), (b"user.a", b"2"))))
@case("open")
def h_xattrs_duplicate(c):
    c.inodes2(R.InodeEntry(2, F, xattrs=((b"user.a", b"1"), (b"user.a", b"2"))))
@case("open")
def h_xattr_reserved_name(c): c.inodes2(R.InodeEntry(2, F, xattrs=((b"user.incfs.id", b"x"),)))
@case("open")
def h_xattr_empty_name(c): c.inodes2(R.InodeEntry(2, F, xattrs=((b"", b"x"),)))
@case("open")
def h_xattr_name_with_nul(c): c.inodes2(R.InodeEntry(2, F, xattrs=((b"user.a\0b", b"x"),)))
@case("open")
def h_xattr_value_over_64k(c):
    c.inodes2(R.InodeEntry(2, F, xattrs=((b"user.big", b"v" * 65537),)))
@case("open")
def h_xattrs_over_a_megabyte(c):
    c.inodes2(R.InodeEntry(2, F, xattrs=tuple((b"user.%02d" % i, b"v" * 65536)
                                              for i in range(17))))
@case("open")
def h_xattr_count_lies(c):
    body = bytearray(R.encode_inodes2([R.InodeEntry(2, F, xattrs=((b"user.a", b"1"),))]))
    struct.pack_into("<H", body, 4 + 100, 5000)  # xattr_count
    c.record(RecordType.INODES2, bytes(body))
@case("open")
def h_xattr_value_length_lies(c):
    body = bytearray(R.encode_inodes2([R.InodeEntry(2, F, xattrs=((b"user.a", b"1"),))]))
    struct.pack_into("<I", body, 4 + 102 + 1, 1 << 31)  # value_len
    c.record(RecordType.INODES2, bytes(body))
@case("ok")
def h_inodes2_device_with_names(c):
    c.inodes2(R.InodeEntry(2, stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), uid=5, gid=6,
                           xattrs=((b"security.selinux", b"x"),)),
              R.InodeEntry(3, stat.S_IFSOCK | 0o666), R.InodeEntry(4, stat.S_IFIFO | 0o600))
    c.add(ROOT_INO, 2, b"null")
    c.add(ROOT_INO, 2, b"null2")  # a hard link to a device
    c.add(ROOT_INO, 3, b"sock")
    c.add(ROOT_INO, 4, b"fifo")


@case("open")
def h_size_2_to_63(c):
    c.record(RecordType.INODES, struct.pack("<I", 1) + struct.pack(
        "<QIIQq16s32sHH", 2, F, 0, 1 << 63, 0, bytes(16), bytes(32), 0, 0))


@case("ok")
def h_size_near_2_to_63(c):
    c.file(2, (1 << 63) - 1, b"huge")
    c.stored_block(2, 0, R.BlockKind.RAW, _text_block(1))
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, (1 << 32) - 1, 0,
                        [(R.block_info(R.BlockKind.ZERO, 0), 0)]))


@case("ok")
def h_many_huge_sparse_files(c):
    # 2000 files claiming 2^62 bytes each, one block mapped in each: memory
    # must follow the blocks stored, not the sizes claimed
    for ino in range(2, 2002):
        c.file(ino, 1 << 62)
    c.blocks(*[R.BlockRun(ino, R.TreeKind.DATA, (ino * 7919) % (1 << 32), 0,
                          [(R.block_info(R.BlockKind.ZERO, 0), 0)]) for ino in range(2, 2002)])


@case("ok")
def h_huge_file_with_a_tree(c):
    c.file(2, (1 << 63) - 1, b"huge-tree", root=b"\x11" * 32)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 5, 0, [(R.block_info(R.BlockKind.ZERO, 0), 0)]))


@case("open")
def h_block_map_past_the_end_of_the_file(c):
    c.file(2, 3 * BLOCK_SIZE)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 2, 0, [(R.block_info(R.BlockKind.ZERO, 0), 0)] * 2))


@case("open")
def h_block_map_for_a_directory(c):
    c.inodes(R.InodeEntry(2, D))
    c.add(ROOT_INO, 2, b"d")
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, 0, [(R.block_info(R.BlockKind.ZERO, 0), 0)]))


@case("open")
def h_hash_map_for_a_file_without_a_tree(c):
    c.file(2, 300 * BLOCK_SIZE)
    c.blocks(R.BlockRun(2, R.TreeKind.HASH, 0, 0, [(R.block_info(R.BlockKind.ZERO, 0), 0)]))


@case("open")
def h_block_overlapping_the_superblock(c):
    c.file(2, BLOCK_SIZE)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, 0, [(R.block_info(R.BlockKind.RAW, 4096), 0)]))


@case("open")
def h_block_ending_inside_the_superblock(c):
    c.file(2, 100)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, 4000,
                        [(R.block_info(R.BlockKind.LZ4, 50), 0)]))


@case("absent")
def h_block_past_the_end_of_the_backing_file(c):
    c.file(2, BLOCK_SIZE)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, 1 << 40,
                        [(R.block_info(R.BlockKind.RAW, 4096), 0)]))


@case("absent")
def h_block_at_offset_2_to_64(c):
    c.file(2, 100)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, (1 << 64) - 1,
                        [(R.block_info(R.BlockKind.LZ4, 100), 0)]))


@case("read")
def h_block_pointing_into_metadata(c):
    # a file with a tree whose block points at the root INODES record; the
    # block's CRC is right for those bytes, so only the Merkle tree can tell
    want = _text_block(2)
    c.file(2, BLOCK_SIZE, root=merkle.tree_of_bytes(want)[0])
    c.data(bytes(BLOCK_SIZE))  # so that 4 KiB exist from LOG_START on
    raw = os.pread(c.app.fd, BLOCK_SIZE, LOG_START)
    c.blocks(R.BlockRun(2, R.TreeKind.DATA, 0, LOG_START,
                        [(R.block_info(R.BlockKind.RAW, 4096), zlib.crc32(raw))]))


@case("open")
def h_stored_size_larger_than_a_block(c):
    c.file(2, BLOCK_SIZE)
    body = R.encode_runs([R.BlockRun(2, R.TreeKind.DATA, 0, 1 << 20, [(0, 0)])])
    body = body[:-6] + struct.pack("<HI", 4097, 0)  # RAW, 4097 stored bytes
    c.record(RecordType.BLOCKS, body)


@case("open")
def h_stored_size_8191(c):
    c.file(2, BLOCK_SIZE)
    body = R.encode_runs([R.BlockRun(2, R.TreeKind.DATA, 0, 1 << 20, [(0, 0)])])
    c.record(RecordType.BLOCKS, body[:-6] + struct.pack("<HI", (2 << 14) | 0x1FFF, 0))


@case("read")
def h_raw_block_shorter_than_its_file_block(c):
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.RAW, b"short")


@case("read")
def h_zstd_frame_claiming_a_terabyte(c):
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 1 << 40) \
        + bytes([1, 0, 0])
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.ZSTD, frame)


@case("read")
def h_zstd_frame_that_expands_to_64_mib(c):
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 * MiB))
    assert len(frame) <= BLOCK_SIZE
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.ZSTD, frame)


@case("read")
def h_zstd_frame_without_size_that_expands(c):
    z = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = z.compress(bytes(64 * MiB)) + z.flush()
    assert len(frame) <= BLOCK_SIZE
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.ZSTD, frame)


@case("read")
def h_lz4_block_that_expands_past_4k(c):
    block = lz4.block.compress(bytes(512 * 1024), store_size=False)
    assert len(block) <= BLOCK_SIZE
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.LZ4, block)


@case("read")
def h_compressed_garbage(c):
    c.file(2, BLOCK_SIZE)
    c.file(3, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.LZ4, b"\xff" * 64)
    c.stored_block(3, 0, R.BlockKind.ZSTD, b"(\xb5/\xfd" + b"\xff" * 60)


@case("read")
def h_hash_blocks_that_do_not_match_the_root(c):
    data = os.urandom(200 * BLOCK_SIZE)
    root, tree = merkle.tree_of_bytes(data)
    c.file(2, len(data), root=root)
    for i, block in enumerate(tree):
        c.stored_block(2, i, R.BlockKind.RAW, bytes(reversed(block)), R.TreeKind.HASH)
    c.stored_block(2, 0, R.BlockKind.RAW, data[:BLOCK_SIZE])


@case("read")
def h_data_block_that_does_not_match_the_tree(c):
    data = os.urandom(3 * BLOCK_SIZE)
    root, tree = merkle.tree_of_bytes(data)
    c.file(2, len(data), root=root)
    c.stored_block(2, 0, R.BlockKind.RAW, tree[0], R.TreeKind.HASH)
    c.stored_block(2, 1, R.BlockKind.RAW, os.urandom(BLOCK_SIZE))


@case("dropped")
def h_record_length_2_to_40(c):
    c.file(2, 1)
    c.record(RecordType.INODES, R.encode_inodes([R.InodeEntry(3, F, 1)]), length=1 << 40)
    c.file(4, 1)


@case("dropped")
def h_record_length_shorter_than_its_body(c):
    c.record(RecordType.INODES, R.encode_inodes([R.InodeEntry(3, F, 1)]), length=40)


@case("dropped")
def h_record_length_unaligned(c):
    c.record(RecordType.INODES, R.encode_inodes([R.InodeEntry(3, F, 1)]), length=203)


@case("dropped")
def h_record_body_len_over_the_limit(c):
    c.record(RecordType.INODES, b"", body_len=(64 << 20) + 8, length=(64 << 20) + 48)


@case("dropped")
def h_record_linking_to_the_wrong_predecessor(c):
    c.record(RecordType.INODES, R.encode_inodes([R.InodeEntry(3, F, 1)]), prev=LOG_START + 8)


@case("open")
def h_inode_count_lies(c):
    body = R.encode_inodes([R.InodeEntry(3, F, 1)])
    c.record(RecordType.INODES, struct.pack("<I", 1_000_000) + body[4:])


@case("open")
def h_inode_count_2_to_32(c):
    body = R.encode_inodes([R.InodeEntry(3, F, 1)])
    c.record(RecordType.INODES, struct.pack("<I", 0xFFFFFFFF) + body[4:])


@case("open")
def h_metadata_length_lies(c):
    body = bytearray(R.encode_inodes([R.InodeEntry(3, F, 1, metadata=b"m" * 10)]))
    struct.pack_into("<H", body, 4 + 80, 400)  # meta_len 400, 10 bytes follow
    c.record(RecordType.INODES, bytes(body))


@case("open")
def h_metadata_over_512(c):
    body = bytearray(R.encode_inodes([R.InodeEntry(3, F, 1, metadata=b"m" * 600)]))
    c.record(RecordType.INODES, bytes(body))


@case("open")
def h_block_run_count_lies(c):
    c.file(2, 10 * BLOCK_SIZE)
    body = bytearray(R.encode_runs([R.BlockRun(2, R.TreeKind.DATA, 0, 0,
                                               [(R.block_info(R.BlockKind.ZERO, 0), 0)])]))
    struct.pack_into("<I", body, 4 + 16, 1_000_000)
    c.record(RecordType.BLOCKS, bytes(body))


@case("open")
def h_block_run_in_an_unknown_tree(c):
    c.file(2, BLOCK_SIZE)
    body = bytearray(R.encode_runs([R.BlockRun(2, R.TreeKind.DATA, 0, 0,
                                               [(R.block_info(R.BlockKind.ZERO, 0), 0)])]))
    body[4 + 8] = 7
    c.record(RecordType.BLOCKS, bytes(body))


@case("open")
def h_dirent_unknown_operation(c):
    c.inodes(R.InodeEntry(2, F, 1))
    c.record(RecordType.DIRENTS, struct.pack("<I", 1) + struct.pack("<BBQQ", 9, 1, 1, 2) + b"x")


@case("open")
def h_signature_length_lies(c):
    body = R.encode_signature(R.SignatureEntry(1, bytes(32), bytes(32), b"s" * 64))
    c.record(RecordType.SIGNATURE, body[:-64] + b"s" * 10)


@case("open")
def h_unknown_critical_record(c): c.record(0x8123, b"must understand")
@case("ok")
def h_unknown_optional_record(c): c.record(0x0123, b"may skip")


@case("ok")
def h_block_maps_for_one_block_twice(c):
    # a loaded block never changes: the second mapping is ignored
    c.file(2, BLOCK_SIZE)
    c.stored_block(2, 0, R.BlockKind.RAW, _text_block(3))
    c.stored_block(2, 0, R.BlockKind.RAW, _text_block(4))


def _build(tmp_path: Path, name: str) -> Path:
    fn, _stage = CASES[name]
    c = Craft(tmp_path / f"{name}.img")
    fn(c)
    return c.close()


# --- exercising an image ------------------------------------------------------------------

def _clean(e: BaseException) -> str:
    """A clean error: ours, or an OSError with an errno; message on one line."""
    assert isinstance(e, (IncfsError, OSError)), repr(e)
    if isinstance(e, OSError) and not isinstance(e, IncfsError):
        assert e.errno, repr(e)
    assert "\n" not in str(e) and "Traceback" not in str(e), str(e)
    return type(e).__name__


def exercise(path: Path) -> dict:
    """Open the image and read everything it claims to hold. Returns what
    happened; raises (failing the test) on anything but a clean error."""
    out = {"open": None, "read_errors": [], "reads": 0, "absent": 0, "dropped": ""}
    try:
        img = Image.open(path)
    except Exception as e:  # noqa: BLE001 - judged by _clean
        out["open"] = _clean(e)
        out["open_message"] = str(e)
        return out
    with img:
        out["dropped"] = img.scan.dropped_reason
        img.totals()
        try:
            img.canonical_root()
            _read_all(img, out)
        except OSError as e:  # an index is checked on access: that access fails
            out["read_errors"].append(_clean(e))
    return out


def _read_all(img: Image, out: dict) -> None:
    for _path, node in itertools.islice(img.ns.walk(), 5000):
        if node.data is None:
            continue
        for bmap in (node.data, node.hashes):
            for i, *_rest in itertools.islice(bmap.entries() if bmap else (), 256):
                try:
                    if bmap is node.data:
                        img.read_block(node, i)
                    else:
                        img.hash_block(node, i)
                    out["reads"] += 1
                except MissingBlock:
                    out["absent"] += 1
                except Exception as e:  # noqa: BLE001
                    out["read_errors"].append(_clean(e))
        for offset in (0, max(0, node.size - 5 * BLOCK_SIZE)):
            try:
                img.read_range(node, offset, 8 * BLOCK_SIZE)
            except MissingBlock:
                pass
            except Exception as e:  # noqa: BLE001
                out["read_errors"].append(_clean(e))
        img.missing_for_read(node, 0, 1 << 20)
        node.data.ranges()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_image_fails_cleanly(tmp_path, name):
    path = _build(tmp_path, name)
    stage = CASES[name][1]
    tracemalloc.start()
    started = time.monotonic()
    try:
        out = exercise(path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert elapsed < TIME_BOUND, elapsed
    assert peak < MEMORY_BOUND, f"peak {peak / MiB:.1f} MiB"
    if stage == "open":
        assert out["open"] == "CorruptImage", out
        assert "checksum" not in out["open_message"]  # the CRCs are right
    elif stage == "read":
        assert out["open"] is None, out
        assert out["read_errors"] and set(out["read_errors"]) <= {"IntegrityError", "BadBlock"}, out
    elif stage == "dropped":
        assert out["open"] is None and out["dropped"], out
        assert "checksum" not in out["dropped"]
    elif stage == "absent":
        assert out["open"] is None and not out["read_errors"], out
        with Image.open(path) as img:
            assert img.blocks_beyond_log == 1
    else:
        assert out["open"] is None and not out["read_errors"], out


def test_huge_sparse_file_reads_its_blocks(tmp_path):
    path = _build(tmp_path, "size_near_2_to_63")
    with Image.open(path) as img:
        node = img.ns.lookup(ROOT_INO, b"huge")
        assert img.read_block(node, 0) == _text_block(1)
        assert img.read_block(node, (1 << 32) - 1) == bytes(BLOCK_SIZE)
        assert node.data.ranges() == [(0, 1), ((1 << 32) - 1, 1 << 32)]
        with pytest.raises(MissingBlock):
            img.read_block(node, 1)


def test_fill_past_block_index_2_to_32_is_refused(tmp_path):
    """Regression: a fill of block 2^32 of a huge file raised struct.error
    out of Image.fill (and took the mount down through the control server)."""
    from incfs.image import FillBlock
    with Image.create(tmp_path / "big.img") as img:
        ino = img.create_node(ROOT_INO, b"big", F, size=(1 << 63) - 1)
        result = img.fill(ino, [FillBlock(1 << 32, b"a" * BLOCK_SIZE),
                                FillBlock((1 << 32) - 1, b"b" * BLOCK_SIZE)])
        assert result.stored == 1 and [e[1] for e in result.errors] == [errno.EFBIG]
    with Image.open(tmp_path / "big.img") as img:
        node = img.ns.lookup(ROOT_INO, b"big")
        assert img.read_block(node, (1 << 32) - 1) == b"b" * BLOCK_SIZE


def test_symlink_target_over_the_limit_is_refused(tmp_path):
    """Regression: create_node stored a 5000-byte symlink target that replay
    refuses, so one loader request made the image unopenable for good."""
    with Image.create(tmp_path / "s.img") as img:
        with pytest.raises(OSError) as exc:
            img.create_node(ROOT_INO, b"l", stat.S_IFLNK | 0o777, size=5000, target=b"t" * 5000)
        assert exc.value.errno == errno.ENAMETOOLONG
        img.create_node(ROOT_INO, b"ok", stat.S_IFLNK | 0o777, size=4095, target=b"t" * 4095)
    with Image.open(tmp_path / "s.img") as img:
        assert len(img.ns.lookup(ROOT_INO, b"ok").target) == 4095


# --- superblocks -------------------------------------------------------------------------

def _superblock_variants():
    good = Superblock(uuid=b"u" * 16)
    raw = bytearray(good.encode())
    yield "bad magic", b"NOTINCFS" + bytes(raw[8:])
    v2 = bytearray(raw)
    struct.pack_into("<H", v2, 8, 2)
    yield "version 2", _fix_sb_crc(v2)
    yield "crc", bytes(raw[:20]) + bytes([raw[20] ^ 1]) + bytes(raw[21:])
    yield "block shift", _fix_sb_crc(bytearray(raw[:12]) + b"\x0d" + raw[13:])
    yield "regions out of order", _fix_sb_crc(_with_regions(raw, 10, 5, 20, 30))
    # the payload ending past the file pack wrote (the check that could never fail)
    yield "data past packed size", _fix_sb_crc(_with_regions(raw, 5000, 8192, 20480, 16384))
    yield "short", bytes(raw[:50])
    yield "empty", b""
    yield "superblock only", bytes(raw)


def _with_regions(raw: bytearray, meta_end, data_start, data_end, packed) -> bytearray:
    out = bytearray(raw)
    struct.pack_into("<QQQQ", out, 32, meta_end, data_start, data_end, packed)
    return out


def _fix_sb_crc(raw: bytearray) -> bytes:
    size = struct.calcsize("<8sHHBBH16sQQQQI")
    struct.pack_into("<I", raw, size - 4, zlib.crc32(bytes(raw[:size - 4])))
    return bytes(raw)


@pytest.mark.parametrize("label,data", list(_superblock_variants()),
                         ids=[v[0] for v in _superblock_variants()])
def test_hostile_superblock(tmp_path, label, data):
    path = tmp_path / "sb.img"
    path.write_bytes(data)
    out = exercise(path)
    assert out["open"] == "CorruptImage", out


def test_not_a_regular_file(tmp_path):
    out = exercise(tmp_path)
    assert out["open"] == "UsageError"


# --- signatures ---------------------------------------------------------------------------

def _signed(tmp_path: Path, keys, content: bytes, name: str) -> Path:
    priv = signing.load_private(keys("ed25519")[0])
    c = Craft(tmp_path / name)
    c.img.create_node(ROOT_INO, b"app", F, size=len(content),
                      root_hash=merkle.tree_of_bytes(content)[0])
    c.img.sign(priv)
    return c.close()


def _other_root_signature(tmp_path, keys) -> R.SignatureEntry:
    other = _signed(tmp_path, keys, b"the real app\n" * 100, "other.img")
    with Image.open(other) as img:
        return img.signature.entry


def test_signature_over_different_content(tmp_path, keys):
    pub = signing.load_public(keys("ed25519")[1])
    entry = _other_root_signature(tmp_path, keys)  # valid, but over another tree
    c = Craft(tmp_path / "evil.img")
    c.file(2, 5, b"app", root=merkle.tree_of_bytes(b"evil\n")[0])
    c.app.append(RecordType.SIGNATURE, R.encode_signature(entry))
    path = c.close()
    with Image.open(path) as img:
        with pytest.raises(IntegrityError, match="differ from what was signed"):
            img.verify_signature(pub)
    # the same root copied in, so only the signature bytes can tell
    c = Craft(tmp_path / "evil2.img")
    c.img.create_node(ROOT_INO, b"app", F, size=5, root_hash=merkle.tree_of_bytes(b"evil\n")[0])
    root = c.img.canonical_root()
    forged = R.SignatureEntry(entry.algorithm, entry.key_id, root, entry.signature)
    c.app.append(RecordType.SIGNATURE, R.encode_signature(forged))
    with Image.open(c.close()) as img:
        with pytest.raises(IntegrityError, match="does not verify"):
            img.verify_signature(pub)
    for alg in (0, 77, 255):
        c = Craft(tmp_path / f"alg{alg}.img")
        bad = R.SignatureEntry(alg, entry.key_id, c.img.canonical_root(), entry.signature)
        c.app.append(RecordType.SIGNATURE, R.encode_signature(bad))
        with Image.open(c.close()) as img:
            with pytest.raises(IntegrityError):
                img.verify_signature(pub)


def test_names_swapped_after_the_signature_are_refused_by_a_keyed_mount(tmp_path, keys):
    """A signed image with records appended after its signature that swap a
    signed file for an unsigned one must not pass a mount's key check
    (`incfs verify --key` already failed it; the mount let it through)."""
    from incfs.mount import MountConfig, check_trust
    path = _signed(tmp_path, keys, b"the real app\n" * 100, "swapped.img")
    with Image.open(path, writable=True) as img:
        img.unlink(ROOT_INO, b"app")
        img.create_node(ROOT_INO, b"app", stat.S_IFREG | 0o755, size=5)
    config = MountConfig(source=str(path), mountpoint=str(tmp_path), key=str(keys("ed25519")[1]))
    with Image.open(path) as img:
        img.verify_signature(signing.load_public(keys("ed25519")[1]))  # the signature itself is fine
        with pytest.raises(IntegrityError, match="after the image was signed"):
            check_trust(img, config)
    # blocks filled after the signature are fine: they change no name
    ok = _signed(tmp_path, keys, b"the real app\n" * 100, "filled.img")
    with Image.open(ok, writable=True) as img:
        from incfs.image import FillBlock
        node = img.ns.lookup(ROOT_INO, b"app")
        img.fill(node.ino, [FillBlock(0, (b"the real app\n" * 100)[:BLOCK_SIZE])])
    with Image.open(ok) as img:
        check_trust(img, MountConfig(source=str(ok), mountpoint=str(tmp_path),
                                     key=str(keys("ed25519")[1])))


# --- a million tiny records ------------------------------------------------------------------

_MILLION_CHILD = textwrap.dedent("""
    import resource, sys, time
    from incfs.image import Image
    def rss():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    base = rss()
    t = time.monotonic()
    with Image.open(sys.argv[1]) as img:
        n = img.scan.records
        files = img.totals()["files"]
    print(n, files, rss() - base, round(time.monotonic() - t, 2))
""")


def test_a_million_tiny_records(tmp_path):
    path = tmp_path / "million.img"
    c = Craft(path)
    empty = {RecordType.INODES: R.encode_inodes([]), RecordType.DIRENTS: R.encode_dirents([]),
             RecordType.BLOCKS: R.encode_runs([]), RecordType.PAD: b"", 0x0123: b""}
    kinds = list(empty)
    append = c.app.append
    for i in range(1_000_000):
        kind = kinds[i % len(kinds)]
        append(kind, empty[kind])
    # and some real ones: a few thousand files in one-inode records
    for ino in range(2, 5002):
        c.file(ino, 1 << 30)
    c.close()
    proc = subprocess.run([sys.executable, "-c", _MILLION_CHILD, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records, files, grew, seconds = proc.stdout.split()
    assert int(records) == 1_000_000 + 1 + 2 * 5000 and int(files) == 5000
    assert int(grew) < 96 * MiB, f"open grew RSS by {int(grew) / MiB:.0f} MiB"
    assert float(seconds) < 60


# --- through FUSE -----------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def _daemon_pid(mountpoint: Path) -> int:
    from incfs.mount import runtime_dir
    return int((runtime_dir(str(mountpoint)) / "pid").read_text())


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@needs_fuse
@pytest.mark.parametrize("name", ["directory_cycle", "inode_in_the_mounts_own_range",
                                  "name_with_slash", "stored_size_larger_than_a_block",
                                  "inode_count_2_to_32"])
def test_mount_refuses_hostile_image(tmp_path, name):
    from incfs.mount import MountConfig, mount_background
    path = _build(tmp_path, name)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(IncfsError) as exc:
        mount_background(MountConfig(source=str(path), mountpoint=str(mnt), allow_unsigned=True))
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message, message
    assert "record at offset" in message
    assert not os.path.ismount(mnt)


@needs_fuse
def test_mount_refuses_signature_over_different_content(tmp_path, keys):
    from incfs.mount import MountConfig, mount_background
    entry = _other_root_signature(tmp_path, keys)
    c = Craft(tmp_path / "evil.img")
    c.file(2, 5, b"app", root=merkle.tree_of_bytes(b"evil\n")[0])
    c.app.append(RecordType.SIGNATURE, R.encode_signature(entry))
    path = c.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(IncfsError) as exc:
        mount_background(MountConfig(source=str(path), mountpoint=str(mnt),
                                     key=str(keys("ed25519")[1])))
    assert "differ from what was signed" in str(exc.value) and "\n" not in str(exc.value)
    assert not os.path.ismount(mnt)


@needs_fuse
def test_mount_serves_bombs_as_eio_and_stays_up(tmp_path):
    """Decompression bombs and blocks that fail their tree: the mount comes
    up (they are valid until read), every bad read is EIO, the daemon's
    memory stays bounded and it keeps answering."""
    from incfs.control import Client
    from incfs.mount import MountConfig, mount_background, umount
    c = Craft(tmp_path / "bombs.img")
    frames = [
        (R.BlockKind.ZSTD, struct.pack("<I", 0xFD2FB528) + bytes([0xE0])
         + struct.pack("<Q", 1 << 40) + bytes([1, 0, 0])),
        (R.BlockKind.ZSTD, zstandard.ZstdCompressor(write_content_size=True).compress(
            bytes(120 * MiB))),
        (R.BlockKind.LZ4, lz4.block.compress(bytes(512 * 1024), store_size=False)),
    ]
    for n, (kind, frame) in enumerate(frames):
        assert len(frame) <= BLOCK_SIZE
        c.file(2 + n, BLOCK_SIZE, b"bomb%d" % n)
        c.stored_block(2 + n, 0, kind, frame)
    good = _text_block(9)
    c.file(10, BLOCK_SIZE, b"good", root=merkle.tree_of_bytes(good)[0])
    c.stored_block(10, 0, R.BlockKind.RAW, good)
    path = c.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source=str(path), mountpoint=str(mnt), allow_unsigned=True))
    try:
        pid = _daemon_pid(mnt)
        before = _vm_hwm(pid)
        for _round in range(20):
            for n in range(len(frames)):
                with pytest.raises(OSError) as exc:
                    with open(mnt / f"bomb{n}", "rb", buffering=0) as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        f.read()
                assert exc.value.errno == errno.EIO
        assert (mnt / "good").read_bytes() == good
        status = Client.connect(mnt).status()
        assert status["read_errors"] >= len(frames)
        grew = _vm_hwm(pid) - before
        assert grew < 32 * MiB, f"daemon peak RSS grew {grew / MiB:.0f} MiB"
    finally:
        umount(str(mnt))
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("name", ["size_near_2_to_63", "huge_file_with_a_tree",
                                  "many_huge_sparse_files"])
def test_verify_work_follows_blocks_stored_not_sizes_claimed(tmp_path, name):
    """Regression: `incfs verify` looped over every block a file claims
    (2^51 for a 2^63-byte file, 2^44 hash blocks): a hang on a tiny image."""
    from incfs.verify import INTEGRITY, NOTE, verify_image
    path = _build(tmp_path, name)
    started = time.monotonic()
    report = verify_image(path)
    assert time.monotonic() - started < 10
    assert report.exit_code in (0, 1)
    absent = [p for p in report.problems if "absent" in p.message]
    assert absent and all(p.severity in (NOTE, INTEGRITY) for p in absent)
    if name == "size_near_2_to_63":
        spans = sorted((p.first, p.last) for p in absent if p.tree == "data")
        assert spans == [(1, (1 << 32) - 2), (1 << 32, (1 << 51) - 1)]


# --- hostile indexes (format 1.2) ---------------------------------------------------------------
#
# A real packed image, edited in its index with every CRC made right again
# (incfs.testing.index_edit), so only the index's own checks can catch the
# edit. "open": refused at open with a one-line CorruptImage; "access": the
# image opens and the access that meets the damage fails with EIO
# (IndexDamage) and a log line; "fine": harmless.
#
# The tree: 1 /, 2 /a, 3 /a/x, 4 /b, 5 /c (100 bytes), 6 /d (9000 bytes).

INDEX_CASES: dict[str, tuple] = {}


def index_case(stage: str, fixed: bool = True):
    def register(fn):
        INDEX_CASES[fn.__name__.removeprefix("x_")] = (fn, stage, fixed)
        return fn
    return register


def _index_tree(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "x").write_bytes(b"0123456789")
    (root / "b").mkdir()
    (root / "c").write_bytes(bytes(range(100)))
    (root / "d").write_bytes(os.urandom(9000))
    # a zero block then a short raw one: a RUN map (the others are RAW)
    (root / "e").write_bytes(bytes(4096) + b"tail")
    return root


def _rec(data: bytearray, ino: int) -> int:
    from incfs.testing.index_edit import inode_at
    return inode_at(data, ino)


def _names(data: bytearray, ino: int) -> int:
    """Where directory `ino`'s name block starts."""
    from incfs.testing.index_edit import regions
    extent = struct.unpack_from("<Q", data, _rec(data, ino) + 48)[0]
    return regions(data)["names"][0] + extent


def _maps(data: bytearray, ino: int) -> int:
    from incfs.testing.index_edit import regions
    extent = struct.unpack_from("<Q", data, _rec(data, ino) + 48)[0]
    return regions(data)["maps"][0] + extent


def _header(data: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, LOG_START + RECORD_HEADER_SIZE + offset, value)


@index_case("open")
def x_unknown_incompatible_feature(d): _header(d, 16, "<I", 1 << 7)


@index_case("fine")
def x_unknown_compatible_feature(d): _header(d, 12, "<I", 1 << 3)


# the whole index is one chunk here, and open reads the root's record from
# it; damage in a chunk open does not read fails only the reads of it
# (test_index.py, test_a_damaged_index_chunk_fails_only_the_reads_of_it)
@index_case("open", fixed=False)
def x_chunk_digest_wrong(d): d[_names(d, 1)] ^= 1


@index_case("open")
def x_chunks_bit_cleared(d): _header(d, 16, "<I", 1)  # the table read as a longer header


@index_case("open")
def x_chunk_shift_too_small(d): _header(d, 152, "<I", 3)


@index_case("open")
def x_chunk_shift_2_to_40(d): _header(d, 152, "<I", 40)


@index_case("open")
def x_chunk_count_lies(d): _header(d, 156, "<I", 1 << 30)


@index_case("open")
def x_chunk_table_outside_the_record(d): _header(d, 160, "<Q", 1 << 40)


@index_case("open")
def x_chunk_table_over_the_regions(d):
    from incfs.testing.index_edit import regions
    _header(d, 160, "<Q", regions(d)["inodes"][0])


@index_case("open", fixed=False)
def x_chunk_table_piece_wrong(d):
    table = struct.unpack_from("<Q", d, LOG_START + RECORD_HEADER_SIZE + 160)[0]
    d[table] ^= 1  # chunk 0's digest: the body's piece digest no longer matches


@index_case("open")
def x_region_outside_the_record(d): _header(d, 52 + 2 * 24 + 8, "<Q", 1 << 40)


@index_case("open")
def x_regions_overlap(d): _header(d, 52 + 1 * 24, "<Q", LOG_START)


@index_case("open")
def x_inode_count_lies(d): _header(d, 20, "<Q", 8)


@index_case("open")
def x_inode_count_2_to_60(d): _header(d, 20, "<Q", 1 << 60)


@index_case("open")
def x_root_is_a_file(d): struct.pack_into("<I", d, _rec(d, 1), stat.S_IFREG | 0o644)


@index_case("open")
def x_header_version_unknown(d): _header(d, 8, "<H", 9)


@index_case("access")
def x_unsorted_names(d):
    base = _names(d, 1)
    first, second = bytes(d[base:base + 16]), bytes(d[base + 16:base + 32])
    d[base:base + 16], d[base + 16:base + 32] = second, first


@index_case("access")
def x_duplicate_names(d):
    base = _names(d, 1)
    struct.pack_into("<I", d, base + 16, struct.unpack_from("<I", d, base)[0])


@index_case("access")
def x_empty_name(d): struct.pack_into("<B", d, _names(d, 1) + 4, 0)


@index_case("access")
def x_name_outside_the_index(d): struct.pack_into("<I", d, _names(d, 1), 0xFFFFFF00)


@index_case("access")
def x_name_inside_the_table(d): struct.pack_into("<I", d, _names(d, 1), 3)


@index_case("access")
def x_child_out_of_range(d): struct.pack_into("<Q", d, _names(d, 2) + 8, 10 ** 9)


@index_case("access")
def x_child_is_the_root(d): struct.pack_into("<Q", d, _names(d, 2) + 8, ROOT_INO)


@index_case("access")
def x_directory_into_itself(d): struct.pack_into("<Q", d, _names(d, 2) + 8, 2)


@index_case("access")
def x_directory_cycle(d):
    # /a's parent says /b, and /b's name block names /a: a loop off the root
    struct.pack_into("<Q", d, _rec(d, 2) + 40, 4)
    struct.pack_into("<Q", d, _names(d, 1) + 8 + 16, 2)  # /b's entry now names /a


@index_case("access")
def x_directory_with_two_names(d):
    struct.pack_into("<Q", d, _names(d, 1) + 8 + 16, 2)  # /b's name now names /a too


@index_case("access")
def x_gigantic_directory(d): struct.pack_into("<I", d, _rec(d, 1) + 56, 0xFFFFFFFF)


@index_case("access")
def x_gigantic_subdirectory(d): struct.pack_into("<I", d, _rec(d, 2) + 56, 0x0FFFFFFF)


@index_case("access")
def x_heap_out_of_range(d):
    struct.pack_into("<QI", d, _rec(d, 5) + 64, 1 << 40, 5)


@index_case("access")
def x_metadata_longer_than_its_blob(d):
    struct.pack_into("<H", d, _rec(d, 5) + 36, 400)


@index_case("access")
def x_block_count_lies(d): struct.pack_into("<I", d, _rec(d, 6) + 56, 1)


@index_case("access")
def x_block_map_outside_the_index(d): struct.pack_into("<Q", d, _rec(d, 6) + 48, 1 << 50)


# Block maps (format.maps): inode 6 (/d) has a RAW map, a head word
# `base | kind << 56`; inode 7 (/e) a RUN map, the head then an info word a block.
def _map_head(d: bytearray, ino: int, base: int, kind: int) -> None:
    struct.pack_into("<Q", d, _maps(d, ino), base | kind << 56)


@index_case("access")
def x_block_inside_the_superblock(d): _map_head(d, 6, 8, 2)


@index_case("access")
def x_block_past_the_payload(d): _map_head(d, 6, 1 << 50, 2)


@index_case("access")
def x_stored_size_over_4096(d):
    struct.pack_into("<H", d, _maps(d, 7) + 8 + 2, 0x1FFF)


@index_case("access")
def x_block_map_of_unknown_kind(d): _map_head(d, 6, 4096, 7)


@index_case("access")
def x_full_map_with_a_base(d): _map_head(d, 3, 4096, 0)


@index_case("access")
def x_map_without_crcs_for_a_file_without_a_tree(d):
    # only a hash tree may stand in for the CRCs a RAW or RUN map leaves out
    struct.pack_into("<H", d, _rec(d, 6) + 4, 0)  # HAS_TREE cleared
    struct.pack_into("<I", d, _rec(d, 6) + 60, 0)  # and no hash blocks


@index_case("access")
def x_map_kinds_bit_cleared(d):
    # the heads and info words read as three columns of 14 bytes a block
    _header(d, 16, "<I", 2)  # CHUNKS alone


@index_case("access")
def x_reserved_inode_bits(d): struct.pack_into("<H", d, _rec(d, 5) + 38, 1)


@index_case("access")
def x_unknown_file_type(d): struct.pack_into("<I", d, _rec(d, 5), 0o170644)


@index_case("access")
def x_file_with_a_parent(d): struct.pack_into("<Q", d, _rec(d, 5) + 40, 1)


# Stored d_types (compat feature DTYPES, byte 5 of a name entry). The root's
# entries: 0 /a, 1 /b (directories), 2 /c, 3 /d (files).
def _stored_type(d: bytearray, ino: int, entry: int, d_type: int) -> None:
    d[_names(d, ino) + entry * 16 + 5] = d_type


@index_case("access")
def x_stored_type_directory_as_file(d): _stored_type(d, 1, 1, stat.S_IFREG >> 12)


@index_case("access")
def x_stored_type_file_as_directory(d): _stored_type(d, 1, 2, stat.S_IFDIR >> 12)


@index_case("access")
def x_stored_type_file_as_symlink(d): _stored_type(d, 1, 2, stat.S_IFLNK >> 12)


@index_case("access")
def x_stored_type_out_of_range(d): _stored_type(d, 1, 3, 0xFF)


@index_case("access")
def x_stored_type_zero(d): _stored_type(d, 2, 0, 0)


@index_case("fine")
def x_stored_types_without_their_feature_bit(d):
    # as a writer before DTYPES: the bit clear, the bytes zero; the types
    # come from the inode records
    _header(d, 12, "<I", 0)
    for ino, count in ((1, 4), (2, 1)):
        for entry in range(count):
            _stored_type(d, ino, entry, 0)


@index_case("fine")
def x_stored_type_wrong_without_the_feature_bit(d):
    _header(d, 12, "<I", 0)  # a reader without the bit never looks at the byte
    _stored_type(d, 1, 1, stat.S_IFREG >> 12)


@pytest.fixture(scope="module")
def index_image(tmp_path_factory) -> bytes:
    from incfs.pack import pack
    base = tmp_path_factory.mktemp("hostile-index")
    pack(_index_tree(base / "src"), base / "img", compress="none")
    return (base / "img").read_bytes()


def _index_build(tmp_path: Path, image: bytes, name: str) -> Path:
    from incfs.testing.index_edit import fix_index
    fn, _stage, fixed = INDEX_CASES[name]
    data = bytearray(image)
    fn(data)
    if fixed:
        assert fix_index(data)
    path = tmp_path / f"{name}.img"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("name", sorted(INDEX_CASES))
def test_hostile_index_fails_cleanly(tmp_path, index_image, name, caplog):
    path = _index_build(tmp_path, index_image, name)
    stage = INDEX_CASES[name][1]
    tracemalloc.start()
    try:
        out = exercise(path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak / MiB:.1f} MiB"
    if stage == "open":
        assert out["open"] == "CorruptImage", out
    elif stage == "access":
        assert out["open"] is None, out
        assert "IndexDamage" in out["read_errors"], out
        assert "image index is damaged" in caplog.text
    else:
        assert out["open"] is None and not out["read_errors"], out


def test_the_untouched_index_image_is_fine(tmp_path, index_image):
    path = tmp_path / "fine.img"
    path.write_bytes(index_image)
    out = exercise(path)
    assert out["open"] is None and not out["read_errors"] and out["reads"] >= 5, out


def _listings(path: Path, encoded: bool) -> tuple[dict[int, tuple], int]:
    """Each directory's listing as a mount makes it: from the records the
    encoder makes of its name block (incfs.block_dirents) when `encoded`
    and it takes the block, else from the names decoded one by one; or the
    error met, with its message. And how many came from the encoder."""
    from incfs.fuse import Listing
    out, from_encoder = {}, 0
    with Image.open(path) as img:
        ns = img.ns
        for ino in range(1, ns.reader.count + 1):
            try:
                node = ns.inodes[ino]
                if not node.is_dir:
                    continue
                got = ns.encoded_listing(node) if encoded else None
                from_encoder += got is not None
                listing = Listing.from_records(*got) if got else Listing(*ns.listing(node))
                out[ino] = (listing.plain(0, 1 << 30).tobytes(), listing.inos, listing.types)
            except OSError as e:
                out[ino] = (_clean(e), str(e))
    return out, from_encoder


@pytest.mark.parametrize("encoder", ["native", "python"])
@pytest.mark.parametrize("name", sorted(n for n, case in INDEX_CASES.items() if case[1] != "open"))
def test_hostile_index_lists_the_same_from_its_name_blocks(tmp_path, index_image, name, encoder,
                                                           monkeypatch):
    """The encoder is a fast path: whatever an index's damage, every
    directory lists the same through it as by decoding its names, or fails
    with the same error, with the C encoder and with the Python one."""
    from incfs import block_dirents
    # make setup builds the extension: its absence is a failure, not a skip
    assert encoder != "native" or block_dirents.NATIVE is not None, "incfs._block_dirents not built"
    if encoder == "python":
        monkeypatch.setattr(block_dirents, "_encode", block_dirents.encode_py)
    path = _index_build(tmp_path, index_image, name)
    assert _listings(path, encoded=True)[0] == _listings(path, encoded=False)[0]


def test_an_untouched_index_lists_every_directory_from_the_encoder(tmp_path, index_image):
    path = tmp_path / "fine.img"
    path.write_bytes(index_image)
    listings, from_encoder = _listings(path, encoded=True)
    assert from_encoder == len(listings) == 3  # /, /a, /b
    assert all(isinstance(got[0], bytes) for got in listings.values())


@needs_fuse
def test_mount_serves_a_damaged_index_as_eio_and_stays_up(tmp_path, index_image):
    """A directory whose names fail their check: listing it is EIO, the rest
    of the tree is served, and the daemon keeps answering."""
    from incfs.control import Client
    from incfs.mount import MountConfig, mount_background, umount
    path = _index_build(tmp_path, index_image, "child_out_of_range")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source=str(path), mountpoint=str(mnt), allow_unsigned=True))
    try:
        for _round in range(3):
            with pytest.raises(OSError) as exc:
                os.listdir(mnt / "a")
            assert exc.value.errno == errno.EIO
        assert sorted(os.listdir(mnt)) == [".incfs", "a", "b", "c", "d", "e"] or \
            sorted(os.listdir(mnt)) == ["a", "b", "c", "d", "e"]
        assert (mnt / "c").read_bytes() == bytes(range(100))
        assert Client.connect(mnt).status()
    finally:
        umount(str(mnt))
    assert not os.path.ismount(mnt)


@needs_fuse
@pytest.mark.parametrize("encoder", ["c", "python"])
@pytest.mark.parametrize("name, where", [("unsorted_names", ""), ("empty_name", ""),
                                         ("name_inside_the_table", ""),
                                         ("child_is_the_root", "a"),
                                         ("directory_into_itself", "a")])
def test_mount_lists_a_damaged_name_block_as_eio(tmp_path, index_image, name, where, encoder,
                                                 monkeypatch):
    """Name blocks the encoder refuses, listed through the kernel: EIO
    each time, by either encoder (the daemon's, as its status says), and
    the daemon keeps answering."""
    from incfs import block_dirents
    from incfs.control import Client
    from incfs.mount import MountConfig, mount_background, umount
    assert encoder != "c" or block_dirents.NATIVE is not None, "incfs._block_dirents not built"
    if encoder == "python":
        monkeypatch.setenv("INCFS_NO_NATIVE", "1")
    path = _index_build(tmp_path, index_image, name)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source=str(path), mountpoint=str(mnt), allow_unsigned=True))
    try:
        for _round in range(2):
            with pytest.raises(OSError) as exc:
                os.listdir(mnt / where)
            assert exc.value.errno == errno.EIO
        status = Client.connect(mnt).status()
        assert status["fuse"]["listing_encoder"] == encoder
    finally:
        umount(str(mnt))
    assert not os.path.ismount(mnt)


@needs_fuse
def test_mount_refuses_a_name_whose_stored_type_lies(tmp_path, index_image):
    """/b (a directory) stored as a file: a plain READDIR record shows what
    is stored (nothing reads the record to list), but every way to the
    inode behind the name fails with EIO: the lookup, and the first
    READDIRPLUS, whose reply carries the inode; the rest is served."""
    from incfs.mount import MountConfig, mount_background, umount
    path = _index_build(tmp_path, index_image, "stored_type_directory_as_file")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source=str(path), mountpoint=str(mnt), allow_unsigned=True))
    try:
        with pytest.raises(OSError) as exc:
            os.stat(mnt / "b")
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.listdir(mnt)  # the first READDIRPLUS holds /b's entry
        assert exc.value.errno == errno.EIO
        assert (mnt / "c").read_bytes() == bytes(range(100))
        assert os.listdir(mnt / "a") == ["x"]
    finally:
        umount(str(mnt))
    assert not os.path.ismount(mnt)
