"""The on-disk format: superblock, record header, record bodies, placement,
compatibility rules, and the layout of a packed image (docs/format.md)."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.errors import CorruptImage
from incfs.format import layout, records
from incfs.format.layout import (LOG_START, RECORD_HEADER_SIZE, RecordHeader,
                                 RecordType, Superblock, SuperFlags)
from incfs.format.records import (BlockKind, BlockRun, DirentEntry, DirentOp,
                                  InodeEntry, InodeFlags, SignatureEntry, TreeKind)
from incfs.image import Image
from incfs.pack import pack

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


# --- superblock -------------------------------------------------------------------

def test_superblock_round_trip_and_offsets():
    sb = Superblock(uuid=bytes(range(16)), flags=SuperFlags.PACKED, meta_end=5000,
                    data_start=8192, data_end=20480, packed_size=20480)
    raw = sb.encode()
    assert len(raw) == BLOCK_SIZE and raw[:8] == b"INCFSIMG"
    assert struct.unpack_from("<HHBBH", raw, 8) == (1, 0, 12, 1, 1)
    assert raw[16:32] == bytes(range(16))
    assert struct.unpack_from("<QQQQ", raw, 32) == (5000, 8192, 20480, 20480)
    assert struct.unpack_from("<I", raw, 64)[0] == zlib.crc32(raw[:64])
    assert raw[68:] == bytes(BLOCK_SIZE - 68)
    assert Superblock.decode(raw) == sb


@pytest.mark.parametrize("offset", [0, 8, 12, 16, 40, 64])
def test_superblock_damage_is_refused(offset):
    raw = bytearray(Superblock(uuid=bytes(16)).encode())
    raw[offset] ^= 0x10
    with pytest.raises(CorruptImage):
        Superblock.decode(bytes(raw))


def test_superblock_version_and_regions():
    newer = Superblock(uuid=bytes(16), version_major=2).encode()
    with pytest.raises(CorruptImage, match="version 2"):
        Superblock.decode(newer)
    minor = Superblock(uuid=bytes(16), version_minor=7).encode()
    assert Superblock.decode(minor).version_minor == 7  # minor versions stay readable
    disorder = Superblock(uuid=bytes(16), meta_end=9000, data_start=4096).encode()
    with pytest.raises(CorruptImage, match="out of order"):
        Superblock.decode(disorder)
    with pytest.raises(CorruptImage):
        Superblock.decode(b"INCFSIMG")


def test_superblock_flags_this_version_does_not_know_are_refused():
    """Every superblock flag changes how the image is read: one from a
    newer writer is refused with a message saying so, not ignored."""
    known = Superblock(uuid=bytes(16), flags=SuperFlags.PACKED | SuperFlags.CACHE)
    assert Superblock.decode(known.encode()) == known
    raw = bytearray(known.encode())
    struct.pack_into("<H", raw, 14, int(known.flags) | 0x8)
    struct.pack_into("<I", raw, 64, zlib.crc32(bytes(raw[:64])))  # a valid checksum
    with pytest.raises(CorruptImage, match="flags 0x8 are not known.*newer"):
        Superblock.decode(bytes(raw))


# --- record header ----------------------------------------------------------------

def test_record_header_layout():
    body = b"hello body"
    header = RecordHeader(int(RecordType.INODES), 0, 48, 4096, len(body))
    raw = header.encode(body)
    assert len(raw) == RECORD_HEADER_SIZE == 32
    magic, rtype, flags, length, prev, body_len, crc = struct.unpack("<IHHQQII", raw)
    assert raw[:4] == b"IREC" and magic == layout.RECORD_MAGIC
    assert (rtype, flags, length, prev, body_len) == (1, 0, 48, 4096, len(body))
    assert crc == zlib.crc32(body, zlib.crc32(raw[:28] + bytes(4)))
    assert RecordHeader.check(raw, body)
    assert not RecordHeader.check(raw, b"hellO body")
    assert RecordHeader.decode(raw) == header


def test_implausible_headers_are_not_records():
    good = RecordHeader(1, 0, 48, 0, 10).encode(bytes(10))
    assert RecordHeader.decode(good[:31]) is None
    assert RecordHeader.decode(b"XREC" + good[4:]) is None
    misaligned = RecordHeader(1, 0, 44, 0, 10).encode(bytes(10))
    assert RecordHeader.decode(misaligned) is None  # lengths are multiples of 8
    too_short = RecordHeader(1, 0, 40, 0, 10).encode(bytes(10))
    assert RecordHeader.decode(too_short) is None  # length < header + body
    huge = RecordHeader(1, 0, 1 << 40, 0, layout.MAX_RECORD_BODY + 8).encode(b"")
    assert RecordHeader.decode(huge) is None


# --- record bodies ----------------------------------------------------------------

names = st.binary(min_size=1, max_size=255)
inode_entries = st.builds(
    InodeEntry, ino=st.integers(1, 2**64 - 1), mode=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**63 - 1), mtime_ns=st.integers(-2**63, 2**63 - 1),
    file_id=st.binary(min_size=16, max_size=16), root_hash=st.binary(min_size=32, max_size=32),
    flags=st.sampled_from([InodeFlags(0), InodeFlags.HAS_TREE]),
    metadata=st.binary(max_size=512), target=st.binary(max_size=300))
dirent_entries = st.builds(DirentEntry, op=st.sampled_from(list(DirentOp)),
                           parent=st.integers(0, 2**64 - 1), child=st.integers(0, 2**64 - 1),
                           name=names)
block_words = st.tuples(
    st.one_of(st.builds(records.block_info, st.sampled_from(list(BlockKind)),
                        st.integers(0, 4096))),
    st.integers(0, 2**32 - 1))
block_runs = st.builds(BlockRun, ino=st.integers(0, 2**64 - 1),
                       tree=st.sampled_from(list(TreeKind)), first=st.integers(0, 2**32 - 1),
                       base=st.integers(0, 2**64 - 1), blocks=st.lists(block_words, max_size=20))


@given(st.lists(inode_entries, max_size=8))
def test_inodes_round_trip(entries):
    assert records.decode_inodes(records.encode_inodes(entries)) == entries


xattr_lists = st.dictionaries(st.binary(min_size=1, max_size=40).filter(
    lambda n: b"\0" not in n and not n.startswith(b"user.incfs.")),
    st.binary(max_size=300), max_size=4).map(lambda d: tuple(sorted(d.items())))
inode2_entries = st.builds(
    InodeEntry, ino=st.integers(1, 2**64 - 1), mode=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**63 - 1), mtime_ns=st.integers(-2**63, 2**63 - 1),
    file_id=st.binary(min_size=16, max_size=16), root_hash=st.binary(min_size=32, max_size=32),
    flags=st.sampled_from([InodeFlags(0), InodeFlags.HAS_TREE]),
    metadata=st.binary(max_size=512), target=st.binary(max_size=300),
    uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1),
    rdev=st.integers(0, 2**64 - 1), xattrs=xattr_lists)


@given(st.lists(inode2_entries, max_size=6))
def test_inodes2_round_trip(entries):
    assert records.decode_inodes2(records.encode_inodes2(entries)) == entries


@given(st.lists(inode2_entries, min_size=1, max_size=3), st.data())
def test_truncated_inodes2_bodies_are_refused(entries, data):
    body = records.encode_inodes2(entries)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(CorruptImage):
        records.decode_inodes2(body[:cut])
    with pytest.raises(CorruptImage, match="trailing"):
        records.decode_inodes2(body + b"\0")


def test_inodes2_layout_matches_the_document():
    e = InodeEntry(7, 0o20644, 0, -5, bytes(range(16)), bytes(range(32)), InodeFlags(0),
                   b"M", b"", 1000, 2000, 0x0000_0001_0000_0103,
                   ((b"security.capability", b"\x01\x02"), (b"user.a", b"")))
    body = records.encode_inodes2([e])
    assert struct.unpack_from("<I", body)[0] == 1
    fixed = body[4:4 + 102]
    assert struct.unpack_from("<QIIQq", fixed) == (7, 0o20644, 0, 0, -5)
    assert struct.unpack_from("<IIQ", fixed, 32) == (1000, 2000, 0x0000_0001_0000_0103)
    assert fixed[48:64] == bytes(range(16)) and fixed[64:96] == bytes(range(32))
    assert struct.unpack_from("<HHH", fixed, 96) == (1, 0, 2)
    rest = body[4 + 102:]
    assert rest[:1] == b"M"
    assert rest[1:6] == struct.pack("<BI", 19, 2) and rest[6:25] == b"security.capability"
    assert rest[25:27] == b"\x01\x02" and rest[27:32] == struct.pack("<BI", 6, 0)
    assert rest[32:] == b"user.a"
    assert RecordType.INODES2 & layout.CRITICAL_TYPE_BIT  # a 1.0 reader must refuse it
    assert records.encode_inode_batch([e])[0] == RecordType.INODES2
    plain = InodeEntry(8, 0o100644)
    assert records.encode_inode_batch([plain]) == (RecordType.INODES,
                                                   records.encode_inodes([plain]))


def test_superblock_payload_must_end_inside_the_packed_file():
    """Regression: `data_end <= max(packed_size, data_end)` could never fail."""
    past = Superblock(uuid=bytes(16), flags=SuperFlags.PACKED, meta_end=5000,
                      data_start=8192, data_end=20480, packed_size=16384).encode()
    with pytest.raises(CorruptImage, match="out of order"):
        Superblock.decode(past)
    ok = Superblock(uuid=bytes(16), flags=SuperFlags.PACKED, meta_end=5000,
                    data_start=8192, data_end=16384, packed_size=16384)
    assert Superblock.decode(ok.encode()) == ok


@pytest.mark.parametrize("meta_end, data_start", [(100, 8192), (5000, 8193)])
def test_superblock_regions_must_be_in_place(meta_end, data_start):
    """Metadata after the superblock, the payload on a 4 KiB boundary."""
    bad = Superblock(uuid=bytes(16), flags=SuperFlags.PACKED, meta_end=meta_end,
                     data_start=data_start, data_end=16384, packed_size=16384).encode()
    with pytest.raises(CorruptImage, match="out of place"):
        Superblock.decode(bad)


@given(st.lists(dirent_entries, max_size=8))
def test_dirents_round_trip(entries):
    assert records.decode_dirents(records.encode_dirents(entries)) == entries


@given(st.lists(block_runs, max_size=6))
def test_runs_round_trip(runs):
    assert records.decode_runs(records.encode_runs(runs)) == runs


def test_signature_round_trip_and_layout():
    entry = SignatureEntry(2, bytes(range(32)), bytes(range(32, 64)), b"S" * 71)
    body = records.encode_signature(entry)
    assert body[0] == 2 and body[1:4] == bytes(3)
    assert body[4:36] == entry.key_id and body[36:68] == entry.root
    assert struct.unpack_from("<H", body, 68)[0] == 71 and body[70:] == b"S" * 71
    assert records.decode_signature(body) == entry


def test_entry_sizes_match_the_document():
    assert records._INODE.size == 84
    assert records._INODE2.size == 102
    assert records._DIRENT.size == 18
    assert records._RUN.size == 28
    assert records._BLOCK.size == 6
    assert records._SIGNATURE.size == 70


@settings(max_examples=300)
@given(st.sampled_from([records.decode_inodes, records.decode_dirents, records.decode_runs,
                        records.decode_signature, records.decode_inodes2]),
       st.binary(max_size=400))
def test_garbage_bodies_raise_only_corrupt_image(decode, body):
    try:
        decode(body)
    except CorruptImage:
        pass


@given(st.lists(inode_entries, min_size=1, max_size=4), st.data())
def test_truncated_bodies_are_refused(entries, data):
    body = records.encode_inodes(entries)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(CorruptImage):
        records.decode_inodes(body[:cut])
    with pytest.raises(CorruptImage, match="trailing"):
        records.decode_inodes(body + b"\0")


# --- block info word and placement ---------------------------------------------

def test_block_info_word():
    for kind in BlockKind:
        for size in (0, 1, 4095, 4096):
            info = records.block_info(kind, size)
            assert info < 1 << 16
            assert records.info_kind(info) is kind and records.info_size(info) == size
    assert records.block_info(BlockKind.ZSTD, 100) == 0x8000 | 100


def test_placement_rule():
    # raw blocks start on a 4 KiB boundary
    assert records.place_block(5, BlockKind.RAW, 4096) == (4096, 8192)
    assert records.place_block(8192, BlockKind.RAW, 10) == (8192, 8202)
    # compressed blocks pack tightly
    assert records.place_block(8202, BlockKind.LZ4, 77) == (8202, 8279)
    assert records.place_block(8279, BlockKind.ZSTD, 5) == (8279, 8284)
    # zero blocks take no space and do not move the cursor
    assert records.place_block(8284, BlockKind.ZERO, 0) == (0, 8284)
    run = BlockRun(1, TreeKind.DATA, 10, 8200, [
        (records.block_info(BlockKind.LZ4, 100), 1), (records.block_info(BlockKind.ZERO, 0), 2),
        (records.block_info(BlockKind.RAW, 4096), 3), (records.block_info(BlockKind.ZSTD, 9), 4)])
    assert [(i, o) for i, o, _info, _crc in records.run_offsets(run)] == [
        (10, 8200), (11, 0), (12, 12288), (13, 16384)]


# --- log compatibility rules -------------------------------------------------------

def _append_record(path: Path, rtype: int, body: bytes) -> None:
    img = Image.open(path)
    last, end = img.scan.last_record, img.scan.end
    img.close()
    length = (RECORD_HEADER_SIZE + len(body) + 7) // 8 * 8
    header = RecordHeader(rtype, 0, length, last, len(body))
    with open(path, "r+b") as f:
        f.seek(end)
        f.write((header.encode(body) + body).ljust(length, b"\0"))


def test_unknown_optional_record_is_skipped(small_tree, tmp_path):
    image = tmp_path / "img"
    pack(small_tree, image)
    _append_record(image, 0x0123, b"from a future minor version")
    with Image.open(image) as img:
        assert img.scan.skipped_unknown == [0x0123]
        assert img.scan.dropped_bytes == 0
        assert len(img.ns) > 10


def test_unknown_critical_record_refuses_the_image(small_tree, tmp_path):
    image = tmp_path / "img"
    pack(small_tree, image)
    _append_record(image, 0x8123, b"must be understood")
    with pytest.raises(CorruptImage, match="0x8123"):
        Image.open(image)


def test_record_that_does_not_link_back_is_dropped(small_tree, tmp_path, raw_image):
    image = tmp_path / "img"
    pack(small_tree, image)
    raw = raw_image(image)
    size = len(raw.data)
    header = RecordHeader(int(RecordType.PAD), 0, 32, LOG_START, 0)  # wrong prev
    raw.data += header.encode(b"")
    raw.save()
    with Image.open(image) as img:
        assert img.scan.end == size
        assert "link" in img.scan.dropped_reason


# --- packed image layout -----------------------------------------------------------

def test_packed_log_layout(small_tree, tmp_path, raw_image, keys):
    """The 1.0/1.1 layout, still written on request (index=False)."""
    image = tmp_path / "img"
    priv, _pub = keys("ed25519")
    pack(small_tree, image, compress="zstd", sign_key=priv, index=False)
    raw = raw_image(image)
    recs = raw.records()
    types = [RecordType(h.type) for _o, h in recs]
    # metadata first: inodes, names, the signature, block maps; then PAD and the payload
    assert types[0] == RecordType.INODES
    order = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]
    assert order == [RecordType.INODES, RecordType.DIRENTS, RecordType.SIGNATURE,
                     RecordType.BLOCKS, RecordType.PAD, RecordType.DATA]
    assert recs[0][1].prev == 0
    for (o1, _h1), (_o2, h2) in zip(recs, recs[1:]):
        assert h2.prev == o1  # every record links back to its predecessor
    for o, h in recs:
        assert o % 8 == 0 and h.length % 8 == 0
    sb = Superblock.decode(bytes(raw.data[:BLOCK_SIZE]))
    assert sb.flags & SuperFlags.PACKED
    pad_offset, pad = recs[-2]
    data_offset, data = recs[-1]
    assert sb.meta_end == pad_offset
    assert sb.data_start == data_offset + RECORD_HEADER_SIZE
    assert sb.data_start % BLOCK_SIZE == 0
    assert sb.packed_size == len(raw.data) == data_offset + data.length
    assert sb.data_end <= sb.packed_size
    assert pad.body_len == 0 and data.body_len == 0
    with Image.open(image) as img:
        for node in img.ns.inodes.values():
            for bmap in (node.data, node.hashes):
                for _i, offset, info, _c in (bmap.entries() if bmap else ()):
                    if records.info_kind(info) is not BlockKind.ZERO:
                        assert sb.data_start <= offset
                        assert offset + records.info_size(info) <= sb.data_end
        assert img.ns.get(ROOT_INO).is_dir


# --- the document ------------------------------------------------------------------

def test_format_document_covers_the_format():
    text = DOC.read_text()
    for rtype in RecordType:
        assert re.search(rf"\b{rtype.name}\b", text), rtype.name
    for needle in ("INCFSIMG", "IREC", "0x8000", "fsverity", "canonical root", "PACKED",
                   "CRC32", "little-endian"):
        assert needle.lower() in text.lower(), needle
