"""Property-based fuzzing of everything that parses untrusted bytes: the record
decoders, the image opener (random bytes after a valid superblock, random
mutations of real images with their CRCs fixed up) and the control protocol
(frame header, payload, tail slices, and the server's dispatch of random JSON).
Only the documented exceptions may escape:

* records.decode_*: CorruptImage;
* Image.open and everything a read does: IncfsError (CorruptImage,
  IntegrityError, UsageError), OSError with an errno, MissingBlock for an
  absent block;
* wire.parse_header / decode_payload / tail_slice: ProtocolError;
* ControlServer._dispatch: nothing -- it always answers.

The coverage-guided versions of these targets are bench/fuzz/fuzz_*.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from incfs import BLOCK_SIZE, ROOT_INO, codec
from incfs.control import wire
from incfs.control.wire import Op, ProtocolError
from incfs.testing.exercise import exercise_image as exercise
from incfs.errors import CorruptImage, IncfsError
from incfs.format import records as R
from incfs.format.layout import (LOG_START, RECORD_HEADER_SIZE, RecordHeader, RecordType,
                                 Superblock)
from incfs.image import FillBlock, Image
from incfs.testing.index_edit import fix_index, regions as index_regions
from incfs.integrity import merkle, signing
from incfs.pack import pack

FAST = settings(max_examples=500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

F = stat.S_IFREG | 0o444
D = stat.S_IFDIR | 0o555


# --- record decoders --------------------------------------------------------------------

DECODERS = [R.decode_inodes, R.decode_dirents, R.decode_runs, R.decode_signature,
            R.decode_inodes2]

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)

inode_entries = st.builds(
    R.InodeEntry, ino=u64, mode=u32, size=st.integers(0, (1 << 63) - 1), mtime_ns=i64,
    file_id=st.binary(min_size=16, max_size=16), root_hash=st.binary(min_size=32, max_size=32),
    flags=st.sampled_from([R.InodeFlags(0), R.InodeFlags.HAS_TREE]),
    metadata=st.binary(max_size=R.MAX_METADATA), target=st.binary(max_size=64))
posix_modes = st.sampled_from([stat.S_IFREG | 0o4755, stat.S_IFDIR | 0o1777, stat.S_IFLNK | 0o777,
                               stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o660, stat.S_IFIFO | 0o600,
                               stat.S_IFSOCK | 0o777]) | u32
inode2_entries = st.builds(
    R.InodeEntry, ino=st.integers(1, 64), mode=posix_modes, size=st.integers(0, 1 << 20),
    mtime_ns=i64, uid=u32, gid=u32, rdev=st.sampled_from([0, 259]) | u64,
    xattrs=st.dictionaries(st.binary(min_size=1, max_size=20), st.binary(max_size=40),
                           max_size=3).map(lambda d: tuple(sorted(d.items()))))
dirent_entries = st.builds(R.DirentEntry, op=st.sampled_from(list(R.DirentOp)), parent=u64,
                           child=u64, name=st.binary(max_size=255))
block_words = st.tuples(
    st.builds(R.block_info, st.sampled_from(list(R.BlockKind)), st.integers(0, 4096)), u32)
block_runs = st.builds(R.BlockRun, ino=u64, tree=st.sampled_from(list(R.TreeKind)), first=u32,
                       base=u64, blocks=st.lists(block_words, max_size=20))
signatures = st.builds(R.SignatureEntry, algorithm=u8, key_id=st.binary(min_size=32, max_size=32),
                       root=st.binary(min_size=32, max_size=32),
                       signature=st.binary(max_size=600))

ENCODED = st.one_of(
    st.lists(inode_entries, max_size=5).map(R.encode_inodes),
    st.lists(inode2_entries, max_size=5).map(R.encode_inodes2),
    st.lists(dirent_entries, max_size=5).map(R.encode_dirents),
    st.lists(block_runs, max_size=5).map(R.encode_runs),
    signatures.map(R.encode_signature),
)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    if cut is not None and out:
        del out[cut % len(out):]
    return bytes(out) + extra


mutated_bodies = st.builds(_mutate, ENCODED, st.lists(st.tuples(u32, u8), max_size=6),
                           st.none() | u32, st.binary(max_size=16))


@FAST
@given(body=st.one_of(st.binary(max_size=400), mutated_bodies),
       decoder=st.sampled_from(DECODERS))
def test_record_decoders_raise_only_corrupt_image(body, decoder):
    try:
        decoder(body)
    except CorruptImage as e:
        assert "\n" not in str(e)


@FAST
@given(entries=st.lists(inode_entries, max_size=5), links=st.lists(dirent_entries, max_size=5),
       runs=st.lists(block_runs, max_size=4), sig=signatures)
def test_record_round_trip(entries, links, runs, sig):
    # inode sizes, metadata and targets were drawn in range: decode gives them back
    assert R.decode_inodes(R.encode_inodes(entries)) == entries
    assert R.decode_dirents(R.encode_dirents(links)) == links
    sig_back = R.decode_signature(R.encode_signature(sig))
    assert sig_back == sig
    # stored sizes were drawn in 0..4096: decode accepts every run back
    assert R.decode_runs(R.encode_runs(runs)) == runs


# --- the image opener -------------------------------------------------------------------------

def _clean(e: BaseException) -> None:
    assert isinstance(e, (IncfsError, OSError)), repr(e)
    if isinstance(e, OSError) and not isinstance(e, IncfsError):
        assert e.errno, repr(e)
    assert "\n" not in str(e), str(e)


def exercise_image(path: Path, public_key=None, blocks_per_file: int = 64) -> str:
    """Open and read an image as a mount would; returns "refused", "opened".
    Anything but a documented exception fails the test."""
    return exercise(path, _clean, public_key=public_key, blocks_per_file=blocks_per_file)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.img"


SUPERBLOCK = Superblock(uuid=b"fuzz-image-uuid!").encode()


def _record(rtype: int, body: bytes, prev: int, extra: bytes = b"") -> bytes:
    length = (RECORD_HEADER_SIZE + len(body) + len(extra) + 7) // 8 * 8
    head = RecordHeader(rtype, 0, length, prev, len(body)).encode(body)
    return (head + body + extra).ljust(length, b"\0")


record_types = st.one_of(st.sampled_from([int(t) for t in RecordType]), u16)


@st.composite
def valid_looking_logs(draw) -> bytes:
    """A superblock, the root directory, then records with right CRCs and back
    links whose bodies are random or mutated encodings."""
    out = bytearray(SUPERBLOCK)
    prev = 0
    root = R.encode_inodes([R.InodeEntry(ROOT_INO, D)])
    for rtype, body in [(int(RecordType.INODES), root)] + draw(st.lists(
            st.tuples(record_types, st.one_of(ENCODED, mutated_bodies, st.binary(max_size=200))),
            max_size=8)):
        offset = len(out)
        extra = draw(st.binary(max_size=64)) if rtype == RecordType.DATA else b""
        out += _record(rtype, body if rtype != RecordType.DATA else b"", prev, extra)
        prev = offset
    return bytes(out) + draw(st.binary(max_size=64))


@FAST
@given(tail=st.one_of(st.binary(max_size=2000), valid_looking_logs()))
def test_random_bytes_after_a_superblock(scratch, tail):
    scratch.write_bytes(SUPERBLOCK + tail if not tail.startswith(SUPERBLOCK) else tail)
    exercise_image(scratch)


def _live_image(path: Path) -> Path:
    """A small image filled the way a loader fills one: every block kind,
    hash blocks, directories, links, a symlink, a removed name."""
    img = Image.create(path)
    img.durable = False
    d = img.create_node(ROOT_INO, b"dir", D)
    data = (b"compressible text " * 400)[:5 * BLOCK_SIZE - 100] + os.urandom(BLOCK_SIZE)
    data += bytes(2 * BLOCK_SIZE) + os.urandom(700)
    root, tree = merkle.tree_of_bytes(data)
    ino = img.create_node(d, b"file", F, size=len(data), root_hash=root)
    img.fill(ino, [FillBlock(i, b, tree=R.TreeKind.HASH) for i, b in enumerate(tree)])
    kinds = [R.BlockKind.RAW, R.BlockKind.LZ4, R.BlockKind.ZSTD]
    n = merkle.block_count(len(data))
    for i in range(n):
        kind, stored = codec.compress(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], kinds[i % 3])
        img.fill(ino, [FillBlock(i, stored, kind)])
    plain = img.create_node(ROOT_INO, b"plain", F, size=3 * BLOCK_SIZE)
    img.fill(plain, [FillBlock(0, os.urandom(BLOCK_SIZE)), FillBlock(2, bytes(BLOCK_SIZE))])
    img.link(ino, ROOT_INO, b"hardlink")
    img.create_node(ROOT_INO, b"sym", stat.S_IFLNK | 0o777, size=4, target=b"dir/")
    img.create_node(ROOT_INO, b"gone", F, size=1)
    img.unlink(ROOT_INO, b"gone")
    img.close()
    return path


class _Images(dict):
    def __repr__(self) -> str:  # keep hypothesis' failure reports short
        return f"<images {sorted(self)}>"


@pytest.fixture(scope="module")
def real_images(small_tree, keys, tmp_path_factory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("fuzz-real")
    packed = base / "packed.img"
    pack(small_tree, packed, compress="zstd", sign_key=keys("ed25519")[0])
    log = base / "log.img"
    pack(small_tree, log, compress="zstd", sign_key=keys("ed25519")[0], index=False)
    live = _live_image(base / "live.img")
    grown = base / "grown.img"  # an index with a log layered over it
    grown.write_bytes(packed.read_bytes())
    with Image.open(grown, writable=True) as img:
        ino = img.create_node(ROOT_INO, b"later", F, size=5)
        img.fill(ino, [FillBlock(0, b"later")])
        img.unlink(ROOT_INO, b"later")
        img.link(ino, ROOT_INO, b"again")
    wide_tree = base / "wide-tree"  # an index of many 4 KiB chunks (format/index_chunks.py)
    for d in range(6):
        (wide_tree / f"d{d}").mkdir(parents=True)
        for i in range(60):
            (wide_tree / f"d{d}" / f"file-{i:03d}").write_bytes(b"w%d-%d" % (d, i))
    wide = base / "wide.img"
    pack(wide_tree, wide, compress="zstd", sign_key=keys("ed25519")[0])
    return _Images(packed=packed.read_bytes(), log=log.read_bytes(), live=live.read_bytes(),
                   grown=grown.read_bytes(), wide=wide.read_bytes())


def _records_of(data: bytes) -> list[tuple[int, RecordHeader]]:
    out, offset = [], LOG_START
    while offset + RECORD_HEADER_SIZE <= len(data):
        header = RecordHeader.decode(data[offset:offset + RECORD_HEADER_SIZE])
        if header is None or offset + header.length > len(data):
            break
        out.append((offset, header))
        offset += header.length
    return out


@st.composite
def mutated_images(draw, images: dict[str, bytes]) -> bytes:
    data = bytearray(images[draw(st.sampled_from(sorted(images)))])
    recs = [(o, h) for o, h in _records_of(bytes(data)) if h.body_len]
    how = draw(st.sampled_from(["body", "body", "flip", "truncate", "append", "index",
                                "index", "chunk"]))
    found = index_regions(data)
    if how == "chunk" and found:
        # change index bytes and leave the chunk digests as they are: the
        # access that reads such a chunk must fail cleanly (EIO)
        start, end = found["inodes"][0], found["heap"][0] + found["heap"][1]
        for pos, bit in draw(st.lists(st.tuples(u32, st.integers(0, 7)), min_size=1,
                                      max_size=4)):
            data[start + pos % (end - start)] ^= 1 << bit
    elif how == "index" and found:
        # change bytes inside the index regions and fix every CRC: only the
        # index's own checks stand between this and the namespace
        start, end = found["inodes"][0], found["heap"][0] + found["heap"][1]
        for pos, value in draw(st.lists(st.tuples(u32, u8), min_size=1, max_size=8)):
            data[start + pos % (end - start)] = value
        if draw(st.booleans()):  # and sometimes the header's fields
            pos = draw(st.integers(LOG_START + RECORD_HEADER_SIZE + 8,
                                   LOG_START + RECORD_HEADER_SIZE + 147))
            data[pos] = draw(u8)
        fix_index(data)
    elif how == "body" and recs:
        # change a metadata record's body and fix its CRC: only the
        # semantic checks stand between this and the namespace
        offset, header = draw(st.sampled_from(recs))
        start = offset + RECORD_HEADER_SIZE
        body = bytearray(data[start:start + header.body_len])
        for pos, value in draw(st.lists(st.tuples(u32, u8), min_size=1, max_size=8)):
            body[pos % len(body)] = value
        data[start:start + len(body)] = body
        data[offset:offset + RECORD_HEADER_SIZE] = header.encode(bytes(body))
    elif how == "flip":
        for pos, bit in draw(st.lists(st.tuples(u32, st.integers(0, 7)), min_size=1, max_size=8)):
            data[pos % len(data)] ^= 1 << bit
    elif how == "truncate":
        del data[draw(st.integers(0, len(data))):]
    else:
        last = _records_of(bytes(data))[-1][0]
        rtype = draw(record_types)
        body = draw(st.one_of(ENCODED, mutated_bodies))
        data += _record(rtype, body if rtype != RecordType.DATA else b"", last,
                        draw(st.binary(max_size=100)) if rtype == RecordType.DATA else b"")
    return bytes(data)


@SLOW
@given(data=st.data())
def test_mutations_of_real_images(real_images, scratch, keys, data):
    scratch.write_bytes(data.draw(mutated_images(real_images), label="image"))
    exercise_image(scratch, signing.load_public(keys("ed25519")[1]))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_survives_mutations(real_images, scratch, data):
    from incfs.verify import verify_image
    from incfs.errors import UsageError
    scratch.write_bytes(data.draw(mutated_images(real_images), label="image"))
    try:
        report = verify_image(scratch)
    except UsageError as e:  # documented: "not an incfs image" is a usage error
        _clean(e)
        return
    assert report.exit_code in (0, 1, 2)


# --- what the live API accepts, replay accepts -----------------------------------------------

names = st.one_of(st.sampled_from([b"a", b"b", b"c", b"dir", b"..", b"", b"x/y", b"n" * 256]),
                  st.binary(min_size=1, max_size=12))
operations = st.lists(st.one_of(
    st.tuples(st.just("file"), st.integers(1, 6), names, st.integers(0, 40_000),
              st.booleans()),
    st.tuples(st.just("mkdir"), st.integers(1, 6), names),
    st.tuples(st.just("symlink"), st.integers(1, 6), names, st.integers(0, 5000)),
    st.tuples(st.just("link"), st.integers(1, 8), st.integers(1, 6), names),
    st.tuples(st.just("unlink"), st.integers(1, 6), names),
    st.tuples(st.just("fill"), st.integers(1, 8), st.integers(-1, 12),
              st.sampled_from(list(R.BlockKind)[:3]), st.booleans()),
), max_size=25)


def _snapshot(img: Image) -> tuple:
    tree = tuple((p, n.ino, n.mode, n.size, n.target, n.nlink) for p, n in img.ns.walk())
    blocks = tuple(sorted((n.ino, t, i) for n in img.ns.inodes.values()
                          for t, b in ((0, n.data), (1, n.hashes)) if b
                          for i, *_r in b.entries()))
    return tree, blocks


@SLOW
@given(ops=operations)
def test_whatever_the_api_accepts_replays(tmp_path, ops):
    """Everything Image accepted from a loader must open again, unchanged:
    a live change that replay refuses would brick the image for good."""
    path = tmp_path / "api.img"
    path.unlink(missing_ok=True)
    contents: dict[int, bytes] = {}
    # a block filled into a file without a tree: nothing can tell a wrong
    # one from the right one (a trusted loader's), so it is what reads back
    untreed: dict[tuple[int, int], bytes] = {}
    with Image.create(path) as img:
        img.durable = False
        for op in ops:
            try:
                if op[0] == "file":
                    _, parent, name, size, tree = op
                    data = bytes((size * 7 + i) % 251 for i in range(size))
                    ino = img.create_node(parent, name, F, size=size,
                                          root_hash=merkle.tree_of_bytes(data)[0] if tree else None)
                    contents[ino] = data
                    if tree:
                        img.fill(ino, [FillBlock(i, b, tree=R.TreeKind.HASH)
                                       for i, b in enumerate(merkle.tree_of_bytes(data)[1])])
                elif op[0] == "mkdir":
                    img.create_node(op[1], op[2], D)
                elif op[0] == "symlink":
                    img.create_node(op[1], op[2], stat.S_IFLNK | 0o777, size=op[3],
                                    target=b"t" * op[3])
                elif op[0] == "link":
                    img.link(op[1], op[2], op[3])
                elif op[0] == "unlink":
                    img.unlink(op[1], op[2])
                else:
                    _, ino, index, kind, wrong = op
                    data = contents.get(ino)
                    if data is None:
                        img.fill(ino, [FillBlock(index, b"x")])
                        continue
                    block = data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
                    if wrong:
                        block = bytes(len(block))[:-1] + b"\x01" if block else b"\x01"
                    k, stored = codec.compress(block, kind) if block else (R.BlockKind.RAW, b"")
                    img.fill(ino, [FillBlock(index, stored, k)])
                    if not img.ns.inodes[ino].has_tree:
                        untreed.setdefault((ino, index), block)
            except OSError as e:
                assert e.errno, repr(e)
            except IncfsError as e:
                _clean(e)
        before = _snapshot(img)
    with Image.open(path) as img:
        assert _snapshot(img) == before
        for node in img.ns.inodes.values():
            for i, *_r in (node.data.entries() if node.data else ()):
                got = img.read_block(node, i)
                want = contents[node.ino][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                assert got == untreed.get((node.ino, i), want)


# --- the control protocol ------------------------------------------------------------------------

@FAST
@given(raw=st.binary(min_size=12, max_size=12))
def test_parse_header(raw):
    try:
        length, version, _op, _rid = wire.parse_header(raw)
    except ProtocolError:
        return
    assert version == wire.VERSION and 0 <= length <= wire.MAX_FRAME


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, -1, 1, 1 << 32, 1 << 62, (1 << 64) - 1, 10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", "none", "lz4", "zstd", "hash", "data", "00" * 32, "zz", "nan", "inf"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
FIELD_NAMES = ["parent", "name", "name_hex", "size", "mode", "file_id", "metadata", "root_hash",
               "target", "ino", "blocks", "index", "offset", "length", "compression", "tree",
               "timeout", "after_serial", "limit"]
fields_strategy = st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=8)
block_specs = st.lists(st.fixed_dictionaries({}, optional={
    k: json_values for k in ("index", "offset", "length", "compression", "tree")}), max_size=4)


def _payload(fields_json: bytes, tail: bytes, jlen: int | None = None) -> bytes:
    return struct.pack("<I", len(fields_json) if jlen is None else jlen) + fields_json + tail


payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda f, t: _payload(json.dumps(f).encode(), t), fields_strategy,
              st.binary(max_size=64)),
    st.builds(lambda v, t: _payload(json.dumps(v).encode(), t), json_values, st.binary(max_size=8)),
    st.builds(lambda depth: _payload(b"[" * depth + b"]" * depth, b""),
              st.integers(1, 200_000)),
    st.builds(_payload, st.binary(max_size=40), st.binary(max_size=40), u32),
)


@FAST
@given(payload=payloads)
def test_decode_payload(payload):
    try:
        fields, tail = wire.decode_payload(payload)
    except ProtocolError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(fields, dict) and isinstance(tail, memoryview)


@FAST
@given(tail=st.binary(max_size=64), offset=json_values, length=json_values)
def test_tail_slice(tail, offset, length):
    try:
        got = wire.tail_slice(memoryview(tail), offset, length)
    except ProtocolError:
        return
    assert got == tail[offset:offset + length] and len(got) == length


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """A ControlServer over a real Service and image, without FUSE."""
    from incfs.control.server import ControlServer
    from incfs.service import Service
    base = tmp_path_factory.mktemp("dispatch")
    img = Image.create(base / "dispatch.img")
    img.durable = False
    data = b"dispatch fuzz " * 1000
    root, tree = merkle.tree_of_bytes(data)
    ino = img.create_node(ROOT_INO, b"file", F, size=len(data), root_hash=root)
    img.create_node(ROOT_INO, b"plain", F, size=3 * BLOCK_SIZE)
    server = ControlServer(Service(img, read_timeout=1.0), base / "ctl.sock", os.getuid())
    yield server, ino, data, tree
    img.close()


def _answer(server, op: int, payload: bytes) -> dict:
    async def run():
        with trio.move_on_after(2):  # a PENDING_READS wait is fine: cut it short
            return await server._dispatch(op, payload)
        return {"ok": True, "waited": True}, b""
    answer = trio.run(run)
    fields, tail = answer
    assert isinstance(fields, dict) and isinstance(tail, (bytes, bytearray))
    assert fields.get("ok") is True or (isinstance(fields.get("errno"), int)
                                        and fields["errno"] > 0), fields
    wire.encode(Op.RESPONSE, 1, fields, tail)  # every answer can be sent
    return fields


ops = st.one_of(st.sampled_from([int(o) for o in Op]), u16)


@FAST
@given(op=ops, payload=payloads)
def test_dispatch_of_random_payloads_always_answers(control, op, payload):
    server, *_ = control
    _answer(server, op, payload)


@FAST
@given(op=st.sampled_from([int(o) for o in Op if o != Op.RESPONSE]), fields=fields_strategy,
       blocks=block_specs, tail=st.binary(max_size=5000))
def test_dispatch_of_random_requests_always_answers(control, op, fields, blocks, tail):
    server, ino, data, tree = control
    if op == Op.FILL_BLOCKS and "blocks" not in fields:
        fields = {**fields, "ino": fields.get("ino", ino), "blocks": blocks}
    if isinstance(fields.get("timeout"), (int, float)) and not math.isnan(fields["timeout"]):
        fields["timeout"] = min(fields["timeout"], 0.5)
    try:
        body = json.dumps(fields).encode()
    except (ValueError, OverflowError):
        assume(False)
    _answer(server, op, _payload(body, tail))


def test_dispatch_fills_and_refuses_cleanly(control):
    """The happy path through the same entry point, so the fuzzers above
    start from requests that work."""
    server, ino, data, tree = control
    specs, tail = [], b""
    for i, b in enumerate(tree):
        specs.append({"index": i, "offset": len(tail), "length": len(b), "tree": 1})
        tail += b
    block = data[:BLOCK_SIZE]
    specs.append({"index": 0, "offset": len(tail), "length": len(block)})
    tail += block
    answer = _answer(server, Op.FILL_BLOCKS, _payload(json.dumps(
        {"ino": ino, "blocks": specs}).encode(), tail))
    assert answer["ok"] and not answer["errors"]
    bad = {"ino": ino, "blocks": [{"index": 1, "offset": 0, "length": BLOCK_SIZE}]}
    answer = _answer(server, Op.FILL_BLOCKS, _payload(json.dumps(bad).encode(),
                                                      bytes(BLOCK_SIZE)))
    assert answer["errors"][0]["errno"] == errno.EBADMSG
    for fields in ({"ino": ino, "blocks": ["x"]}, {"timeout": 10 ** 400},
                   {"ino": ino, "blocks": [{"index": 1 << 40, "offset": 0, "length": 0}]}):
        op = Op.PENDING_READS if "timeout" in fields else Op.FILL_BLOCKS
        answer = _answer(server, op, _payload(json.dumps(fields).encode(), b""))
        assert not answer["ok"] or answer.get("errors"), answer
