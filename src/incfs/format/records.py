"""Bodies of the metadata records, encoded and decoded as plain values.

Records batch many entries (an INODES record holds up to thousands of inodes)
so a million-file image is a few hundred records, not millions, and a reader
parses them with one `struct` call per entry.
"""

from __future__ import annotations

import enum
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from ..errors import CorruptImage
from .layout import RecordType

MAX_NAME = 255
MAX_METADATA = 512
MAX_SYMLINK = 4095
MAX_FILE_SIZE = (1 << 63) - 1
MAX_XATTR_NAME = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX
MAX_XATTR_NAMES = 65536  # XATTR_LIST_MAX: listxattr(2) returns at most this
MAX_XATTR_BYTES = 1 << 20  # names and values of one inode together
MAX_XATTRS = 0xFFFF
# incfs's own attributes, served by the mount: an image may not hold them.
RESERVED_XATTR_PREFIX = b"user.incfs."
# File types an INODES (1.0) record can describe; anything else, or owners,
# devices and attributes, needs an INODES2 record.
V1_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)

Xattrs = tuple[tuple[bytes, bytes], ...]  # (name, value) pairs in ascending name order


class InodeFlags(enum.IntFlag):
    HAS_TREE = 1  # root_hash is meaningful: blocks are verified against it


class BlockKind(enum.IntEnum):
    """How one stored block is encoded (2 bits of the per-block info word)."""

    RAW = 0
    LZ4 = 1
    ZSTD = 2
    ZERO = 3  # an all-zero block: no bytes stored


class TreeKind(enum.IntEnum):
    """Which per-file block space a run of blocks belongs to."""

    DATA = 0
    HASH = 1


class DirentOp(enum.IntEnum):
    ADD = 1
    REMOVE = 2


# ino, mode, flags, size, mtime_ns, file_id, root_hash, meta_len, target_len
_INODE = struct.Struct("<QIIQq16s32sHH")
# ino, mode, flags, size, mtime_ns, uid, gid, rdev, file_id, root_hash,
# meta_len, target_len, xattr_count
_INODE2 = struct.Struct("<QIIQqIIQ16s32sHHH")
# name_len, value_len
_XATTR = struct.Struct("<BI")
# op, name_len, parent, child
_DIRENT = struct.Struct("<BBQQ")
# ino, tree, reserved, first_index, count, base_offset
_RUN = struct.Struct("<QBxxxIIQ")
# info (size | kind << 14), crc32 of the stored bytes
_BLOCK = struct.Struct("<HI")
# algorithm, key_id, root, sig_len
_SIGNATURE = struct.Struct("<B3x32s32sH")
_COUNT = struct.Struct("<I")


@dataclass(slots=True)
class InodeEntry:
    ino: int
    mode: int
    size: int = 0
    mtime_ns: int = 0
    file_id: bytes = bytes(16)
    root_hash: bytes = bytes(32)
    flags: InodeFlags = InodeFlags(0)
    metadata: bytes = b""
    target: bytes = b""  # symlink target; empty for files and directories
    uid: int = 0
    gid: int = 0
    rdev: int = 0  # st_rdev of character and block devices
    xattrs: Xattrs = ()


def file_type(mode: int) -> int:
    """A mode's file type as a d_type (its top four bits: DT_DIR is 4)."""
    return stat.S_IFMT(mode) >> 12


def needs_inodes2(e: InodeEntry) -> bool:
    """True when an INODES (1.0) record cannot hold this inode."""
    return bool(e.uid or e.gid or e.rdev or e.xattrs) or stat.S_IFMT(e.mode) not in V1_TYPES


def xattr_problem(xattrs: Xattrs) -> str:
    """Why a set of extended attributes cannot be stored, or "" if it can.
    Names are unique and sorted so an inode has exactly one encoding."""
    names_total = values_total = 0
    previous = None
    if len(xattrs) > MAX_XATTRS:
        return f"more than {MAX_XATTRS} extended attributes"
    for name, value in xattrs:
        if not name or len(name) > MAX_XATTR_NAME or b"\0" in name:
            return f"bad extended attribute name {name[:40]!r}"
        if name.startswith(RESERVED_XATTR_PREFIX):
            return f"extended attribute {name[:40]!r} is reserved for incfs"
        if len(value) > MAX_XATTR_VALUE:
            return f"extended attribute {name[:40]!r} is over {MAX_XATTR_VALUE} bytes"
        if previous is not None and name <= previous:
            return "extended attributes are not sorted or not unique"
        previous = name
        names_total += len(name) + 1
        values_total += len(value)
    if names_total > MAX_XATTR_NAMES or names_total + values_total > MAX_XATTR_BYTES:
        return "extended attributes too large"
    return ""


class DirentEntry(NamedTuple):
    op: DirentOp
    parent: int
    child: int
    name: bytes


@dataclass(slots=True)
class BlockRun:
    """Consecutive blocks of one file stored from `base` on.

    `blocks` holds (info, crc) pairs; the offset of each block follows from
    `base` by the placement rule in `block_offsets`.
    """

    ino: int
    tree: TreeKind
    first: int
    base: int
    blocks: list[tuple[int, int]] = field(default_factory=list)


class SignatureEntry(NamedTuple):
    algorithm: int
    key_id: bytes
    root: bytes
    signature: bytes


def block_info(kind: BlockKind, stored_size: int) -> int:
    return stored_size | (int(kind) << 14)


def info_kind(info: int) -> BlockKind:
    return BlockKind(info >> 14)


def info_size(info: int) -> int:
    return info & 0x1FFF


_ZERO_KIND = int(BlockKind.ZERO)


def info_bytes(info: int) -> int:
    """Bytes a block takes in the source: its stored size, 0 for a zero
    block. Plain integer work for loops over every block of an image
    (info_kind's enum call costs ~1 us: 0.3 s over a 1 GiB image)."""
    return 0 if info >> 14 == _ZERO_KIND else info & 0x1FFF


def place_block(cursor: int, kind: BlockKind, stored_size: int) -> tuple[int, int]:
    """Placement rule: where a block goes and where the next one may start.

    Full raw blocks start on a 4 KiB boundary so a kernel EROFS image can map
    them in place; compressed blocks and short raw tails (a small file's only
    block) pack tightly, so tiny files do not cost 4 KiB each; zero blocks
    take no space.
    """
    if kind is BlockKind.ZERO:
        return 0, cursor
    if kind is BlockKind.RAW and stored_size == 4096:
        cursor = (cursor + 4095) & ~4095
    return cursor, cursor + stored_size


def run_offsets(run: BlockRun) -> Iterator[tuple[int, int, int, int]]:
    """Yield (index, offset, info, crc) for each block of a run."""
    cursor = run.base
    for i, (info, crc) in enumerate(run.blocks):
        offset, cursor = place_block(cursor, info_kind(info), info_size(info))
        yield run.first + i, offset, info, crc


# --- encoding ---------------------------------------------------------------

def encode_inodes(entries: list[InodeEntry]) -> bytes:
    parts = [_COUNT.pack(len(entries))]
    for e in entries:
        parts.append(_INODE.pack(e.ino, e.mode, int(e.flags), e.size,
                                 e.mtime_ns, e.file_id, e.root_hash,
                                 len(e.metadata), len(e.target)))
        parts.append(e.metadata)
        parts.append(e.target)
    return b"".join(parts)


def encode_inodes2(entries: list[InodeEntry]) -> bytes:
    parts = [_COUNT.pack(len(entries))]
    for e in entries:
        parts.append(_INODE2.pack(e.ino, e.mode, int(e.flags), e.size, e.mtime_ns,
                                  e.uid, e.gid, e.rdev, e.file_id, e.root_hash,
                                  len(e.metadata), len(e.target), len(e.xattrs)))
        parts.append(e.metadata)
        parts.append(e.target)
        for name, value in e.xattrs:
            parts.append(_XATTR.pack(len(name), len(value)))
            parts.append(name)
            parts.append(value)
    return b"".join(parts)


def encode_inode_batch(entries: list[InodeEntry]) -> tuple[int, bytes]:
    """(record type, body) for a batch: INODES when every inode fits the 1.0
    record, so images without the new metadata stay readable by 1.0 readers."""
    if any(needs_inodes2(e) for e in entries):
        return RecordType.INODES2, encode_inodes2(entries)
    return RecordType.INODES, encode_inodes(entries)


def encode_dirents(entries: list[DirentEntry]) -> bytes:
    parts = [_COUNT.pack(len(entries))]
    for e in entries:
        parts.append(_DIRENT.pack(int(e.op), len(e.name), e.parent, e.child))
        parts.append(e.name)
    return b"".join(parts)


def encode_runs(runs: list[BlockRun]) -> bytes:
    parts = [_COUNT.pack(len(runs))]
    for r in runs:
        parts.append(_RUN.pack(r.ino, int(r.tree), r.first, len(r.blocks), r.base))
        parts.extend(_BLOCK.pack(info, crc) for info, crc in r.blocks)
    return b"".join(parts)


def encode_signature(s: SignatureEntry) -> bytes:
    return _SIGNATURE.pack(s.algorithm, s.key_id, s.root, len(s.signature)) + s.signature


# --- decoding ---------------------------------------------------------------

class _Cursor:
    """Bounds-checked reading of a record body: a lying length is an error,
    never an IndexError or a read past the body."""

    def __init__(self, body: bytes, what: str):
        self.body = memoryview(body)
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.body):
            raise CorruptImage(f"{self.what} record is truncated or lies about its length")
        view = self.body[self.pos:end]
        self.pos = end
        return view

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def count(self, entry_size: int) -> int:
        (n,) = self.unpack(_COUNT)
        if n * entry_size > len(self.body) - self.pos:
            raise CorruptImage(f"{self.what} record claims {n} entries, too many for its size")
        return n

    def done(self) -> None:
        if self.pos != len(self.body):
            raise CorruptImage(f"{self.what} record has trailing bytes")


def decode_inodes(body: bytes) -> list[InodeEntry]:
    cur = _Cursor(body, "inode")
    out = []
    for _ in range(cur.count(_INODE.size)):
        ino, mode, flags, size, mtime, fid, root, mlen, tlen = cur.unpack(_INODE)
        if mlen > MAX_METADATA or tlen > MAX_SYMLINK or size > MAX_FILE_SIZE:
            raise CorruptImage(f"inode {ino}: metadata, target or size out of range")
        meta = bytes(cur.take(mlen))
        target = bytes(cur.take(tlen))
        out.append(InodeEntry(ino, mode, size, mtime, fid, root,
                              InodeFlags(flags & 1), meta, target))
    cur.done()
    return out


def decode_inodes2(body: bytes) -> list[InodeEntry]:
    cur = _Cursor(body, "inode")
    out = []
    for _ in range(cur.count(_INODE2.size)):
        (ino, mode, flags, size, mtime, uid, gid, rdev, fid, root, mlen, tlen,
         xcount) = cur.unpack(_INODE2)
        if mlen > MAX_METADATA or tlen > MAX_SYMLINK or size > MAX_FILE_SIZE:
            raise CorruptImage(f"inode {ino}: metadata, target or size out of range")
        meta = bytes(cur.take(mlen))
        target = bytes(cur.take(tlen))
        xattrs = _decode_xattrs(cur, xcount)
        why = xattr_problem(xattrs)
        if why:
            raise CorruptImage(f"inode {ino}: {why}")
        out.append(InodeEntry(ino, mode, size, mtime, fid, root, InodeFlags(flags & 1),
                              meta, target, uid, gid, rdev, xattrs))
    cur.done()
    return out


def _decode_xattrs(cur: "_Cursor", count: int) -> Xattrs:
    pairs = []
    for _ in range(count):
        nlen, vlen = cur.unpack(_XATTR)
        if vlen > MAX_XATTR_VALUE:
            raise CorruptImage("extended attribute value over 64 KiB")
        name = bytes(cur.take(nlen))
        pairs.append((name, bytes(cur.take(vlen))))
    return tuple(pairs)


def decode_dirents(body: bytes) -> list[DirentEntry]:
    cur = _Cursor(body, "directory")
    out = []
    for _ in range(cur.count(_DIRENT.size)):
        op, nlen, parent, child = cur.unpack(_DIRENT)
        if op not in (DirentOp.ADD, DirentOp.REMOVE):
            raise CorruptImage(f"directory record has unknown operation {op}")
        out.append(DirentEntry(DirentOp(op), parent, child, bytes(cur.take(nlen))))
    cur.done()
    return out


def decode_runs(body: bytes) -> list[BlockRun]:
    cur = _Cursor(body, "block map")
    runs = []
    for _ in range(cur.count(_RUN.size)):
        ino, tree, first, count, base = cur.unpack(_RUN)
        if tree not in (0, 1):
            raise CorruptImage(f"block map of inode {ino} names unknown tree {tree}")
        raw = cur.take(count * _BLOCK.size)
        blocks = list(_BLOCK.iter_unpack(raw))
        for info, _crc in blocks:
            if info_size(info) > 4096 or (info & 0x2000):
                raise CorruptImage(f"block map of inode {ino}: stored size over 4096")
        runs.append(BlockRun(ino, TreeKind(tree), first, base, blocks))
    cur.done()
    return runs


def decode_signature(body: bytes) -> SignatureEntry:
    cur = _Cursor(body, "signature")
    alg, key_id, root, slen = cur.unpack(_SIGNATURE)
    sig = bytes(cur.take(slen))
    cur.done()
    return SignatureEntry(alg, key_id, root, sig)
