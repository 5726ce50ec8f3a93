"""The compact metadata index (format 1.2): what pack writes, what a reader
serves from it, the log layered over it, signatures over it, and caches made
from it. Hostile indexes are in test_hostile_images.py."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from incfs import ROOT_INO
from incfs.errors import CorruptImage, IntegrityError
from incfs.format.layout import RecordType
from incfs.image import FillBlock, Image
from incfs.index_ns import IndexNamespace
from incfs.integrity import signing
from incfs.pack import pack
from incfs.testing.index_edit import fix_index, inode_at, regions
from incfs.verify import verify_image

from conftest import RawImage

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0,
                                reason="needs /dev/fuse and root")


def _served(img: Image) -> list[tuple]:
    """Everything a mount shows of the tree, file contents included."""
    out = []
    for path, n in img.ns.walk():
        body = img.read_range(n, 0, n.size) if n.is_reg else b""
        out.append((path, n.ino, n.mode, n.size, n.mtime_ns, n.uid, n.gid, n.rdev,
                    n.nlink, n.parent, n.target, n.file_id, n.root_hash, n.metadata,
                    dict(n.xattrs), body))
    return out


@pytest.mark.parametrize("tree", ["small_tree", "posix_tree"])
def test_index_serves_what_the_log_serves(request, tree, tmp_path):
    src = request.getfixturevalue(tree)
    pack(src, tmp_path / "index.img")
    pack(src, tmp_path / "log.img", index=False)
    with Image.open(tmp_path / "index.img") as a, Image.open(tmp_path / "log.img") as b:
        assert isinstance(a.ns, IndexNamespace) and not isinstance(b.ns, IndexNamespace)
        served = _served(a)
        ids = lambda rows: [r[:2] + r[2:11] + r[12:] for r in rows]  # noqa: E731  file ids aside
        assert ids(served) == ids(_served(b))
        assert a.ns.posix == b.ns.posix
        assert a.totals() == b.totals()
        assert len(a.ns) == len(b.ns) and a.ns.next_ino == b.ns.next_ino


def test_layout_and_open_builds_no_inode(small_tree, tmp_path, keys):
    image = tmp_path / "img"
    pack(small_tree, image, sign_key=keys("ed25519")[0])
    types = [RecordType(h.type) for _o, h in RawImage(image).records()]
    assert types == [RecordType.INDEX, RecordType.SIGNATURE, RecordType.PAD, RecordType.DATA]
    with Image.open(image) as img:
        assert img.superblock.version_minor == 2
        # the signature's root was checked against the index bytes: no inode built
        assert not img.ns.inodes.pinned and not len(img.ns.inodes.live)
        img.verify_signature(signing.load_public(keys("ed25519")[1]))
        assert img.ns.lookup(ROOT_INO, b"text.txt").signed


def test_index_bytes_are_canonical(small_tree, tmp_path):
    pack(small_tree, tmp_path / "a.img")
    pack(small_tree, tmp_path / "b.img")
    a, b = (tmp_path / "a.img").read_bytes(), (tmp_path / "b.img").read_bytes()
    ra, rb = regions(a), regions(b)
    assert ra == rb
    first, last = ra["inodes"][0], ra["heap"][0] + ra["heap"][1]
    assert a[first:last] == b[first:last]


def test_the_log_is_layered_over_the_index(small_tree, tmp_path, keys):
    image = tmp_path / "img"
    priv, pub = keys("ed25519")
    pack(small_tree, image, sign_key=priv)
    with Image.open(image, writable=True) as img:
        before = img.canonical_root()
        count = img.index.count
        ino = img.create_node(ROOT_INO, b"new.txt", stat.S_IFREG | 0o444, size=5)
        assert ino == count + 1
        img.fill(ino, [FillBlock(0, b"fresh")])
        hello = img.ns.lookup(ROOT_INO, b"text.txt").ino
        links = img.ns.get(hello).nlink
        img.link(hello, ROOT_INO, b"text-again.txt")
        img.unlink(ROOT_INO, b"text.txt")
        assert img.canonical_root() != before
    with Image.open(image) as img:
        ns = img.ns
        assert isinstance(ns, IndexNamespace)
        assert img.read_range(ns.lookup(ROOT_INO, b"new.txt"), 0, 5) == b"fresh"
        assert ns.lookup(ROOT_INO, b"text-again.txt").ino == hello
        assert b"text.txt" not in ns.get(ROOT_INO).children
        names = [name for name, _ in ns.get(ROOT_INO).children.items()]
        assert b"new.txt" in names and b"text.txt" not in names
        assert len(ns) == count + 1 and ns.get(hello).nlink == links
        assert img.totals()["files"] == img.index.header.files + 1
        assert img.changed_since_signature()
    assert verify_image(image, pub).exit_code == 1


def test_fills_over_an_index_survive_reopening(tmp_path):
    """A cache of an indexed image: the index says where blocks are in the
    source; fills land in the cache's log and count as present."""
    from incfs.loader import write_cache
    from incfs.format.layout import Superblock
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(3 * 4096))
    pack(src, tmp_path / "img", compress="none")
    raw = (tmp_path / "img").read_bytes()
    sb = Superblock.decode(raw[:4096])
    cache = write_cache(tmp_path / "cache.img", sb, raw[:sb.meta_end])
    try:
        node = cache.ns.lookup(ROOT_INO, b"a.bin")
        assert node.data.present == 0 and cache.source_maps[node.ino][0].present == 3
        tree = [FillBlock(0, raw[o:o + 4096], tree=1)
                for _i, o, _info, _c in cache.source_maps[node.ino][1].entries()]
        offsets = [o for _i, o, _info, _c in cache.source_maps[node.ino][0].entries()]
        result = cache.fill(node.ino, tree + [FillBlock(1, raw[offsets[1]:offsets[1] + 4096])])
        assert result.stored == 2 and not result.errors
        assert cache.totals()["blocks_present"] == 2
    finally:
        cache.close()
    with Image.open(tmp_path / "cache.img") as again:
        node = again.ns.lookup(ROOT_INO, b"a.bin")
        assert node.data.present == 1 and again.totals()["blocks_present"] == 2
        assert again.read_block(node, 1) == (src / "a.bin").read_bytes()[4096:8192]


def _wide_tree(root: Path, files: int = 600) -> Path:
    """Enough files for an inode table of several chunks."""
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:04d}").write_bytes(b"x%d" % i)
    return root


def _chunk_of(img: Image, ino: int) -> int:
    check = img.index.check
    return (img.index.r["inodes"].offset + (ino - 1) * 128 - check.base) >> check.shift


def test_a_damaged_index_chunk_fails_only_the_reads_of_it(tmp_path, keys, caplog):
    """A flipped byte (no digest fixed) in the inode table's third chunk: the
    image opens, and its signature verifies, without reading that chunk;
    every read of it fails with EIO and a log line, the rest serves on, and
    `incfs verify` names the chunk."""
    priv, pub = keys("ed25519")
    image = tmp_path / "img"
    pack(_wide_tree(tmp_path / "src"), image, sign_key=priv)
    with Image.open(image) as img:
        assert img.index.header.chunks.shift == 12 and len(img.index.check.state) >= 4
        victim = next(n for n in range(2, 601) if _chunk_of(img, n) == 2)
        healthy = next(n for n in range(2, 601) if _chunk_of(img, n) == 1)
    data = bytearray(image.read_bytes())
    data[inode_at(data, victim) + 16] ^= 1  # an mtime bit
    image.write_bytes(bytes(data))
    with Image.open(image) as img:
        img.verify_signature(signing.load_public(pub))  # the table is what is signed
        assert img.ns.stat(healthy) is not None
        for _ in range(2):  # known bad: the second read fails without hashing again
            with pytest.raises(OSError) as err:
                img.ns.stat(victim)
            assert err.value.errno == errno.EIO
        assert img.index.check.bad == 1
        assert img.ns.stat(healthy) is not None
    assert "index chunk 2" in caplog.text and "does not match its digest" in caplog.text
    report = verify_image(image, pub)
    assert report.exit_code == 1
    assert any("index chunk 2 " in p.message for p in report.problems), report.problems


def test_a_damaged_chunk_table_piece_fails_the_chunks_it_lists(tmp_path, caplog):
    """The body holds a digest per 4 KiB of chunk table (128 chunks), so
    opening reads no table at all; a flipped table byte fails the reads of
    the chunks its piece lists, and only those."""
    from incfs.format.index import HEADER_SIZE
    from incfs.format.index_chunks import DESCRIPTOR_SIZE
    from incfs.format.layout import LOG_START, RECORD_HEADER_SIZE, RecordHeader
    image = tmp_path / "img"
    pack(_wide_tree(tmp_path / "src", 5000), image)  # 5,001 records: over 156 chunks
    data = bytearray(image.read_bytes())
    with Image.open(image) as img:
        table = img.index.header.chunks
        pieces = (table.count + 127) // 128
        assert pieces >= 2 and len(table.pieces) == 32 * pieces
        header = RecordHeader.decode(bytes(data[LOG_START:LOG_START + RECORD_HEADER_SIZE]))
        assert header.body_len == HEADER_SIZE + DESCRIPTOR_SIZE + 32 * pieces
        victim = next(n for n in range(2, 5002) if _chunk_of(img, n) == 130)
        neighbour = next(n for n in range(2, 5002) if _chunk_of(img, n) == 140)
        healthy = next(n for n in range(2, 5002) if _chunk_of(img, n) == 100)
        assert img.index.check.pieces == {0: img.index.check.pieces[0]}  # the root's, at open
        offset = table.offset
    data[offset + 130 * 32] ^= 1  # chunk 130's digest, in the table's second piece
    image.write_bytes(bytes(data))
    with Image.open(image) as img:
        assert img.ns.stat(healthy) is not None
        with pytest.raises(OSError) as err:
            img.ns.stat(victim)
        assert err.value.errno == errno.EIO and "chunk table piece 1" in str(err.value)
        with pytest.raises(OSError):
            img.ns.stat(neighbour)  # listed by the same piece
        assert img.ns.stat(healthy) is not None
    report = verify_image(image)
    assert report.exit_code == 1
    assert any("index chunk 130 " in p.message for p in report.problems)
    assert not any("index chunk 100 " in p.message for p in report.problems)


def test_an_index_chunk_table_that_does_not_fit_is_refused(small_tree, tmp_path):
    image = tmp_path / "img"
    pack(small_tree, image)
    data = bytearray(image.read_bytes())
    from incfs.format.index import HEADER_SIZE
    from incfs.format.layout import LOG_START, RECORD_HEADER_SIZE
    struct.pack_into("<I", data, LOG_START + RECORD_HEADER_SIZE + HEADER_SIZE + 4, 7)
    assert fix_index(data)
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="index chunk table does not match"):
        Image.open(image)


def test_an_index_from_before_chunks_is_read_and_checked_at_open(tmp_path, monkeypatch):
    """An index with a CRC per region (the CHUNKS bit clear): read as it
    always was, and a flipped byte refuses the image at open."""
    import incfs.pack
    from incfs.format.index_chunks import INCOMPAT_CHUNKS
    from incfs.pack_index import IndexWriter

    class OldWriter(IndexWriter):
        def __init__(self, tmpdir):
            super().__init__(tmpdir, chunks=False)

    monkeypatch.setattr(incfs.pack, "IndexWriter", OldWriter)
    image = tmp_path / "img"
    pack(_wide_tree(tmp_path / "src", 300), image)
    with Image.open(image) as img:
        assert not img.index.header.incompat & INCOMPAT_CHUNKS
        assert img.index.header.chunks is None
        assert sorted(p for p, n in img.ns.walk() if n.is_reg) == sorted(
            b"/f%04d" % i for i in range(300))
        assert verify_image(image).ok
    data = bytearray(image.read_bytes())
    data[inode_at(data, 200) + 16] ^= 1  # an mtime bit, CRC not fixed
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="index region inodes checksum mismatch"):
        Image.open(image)


def test_a_tampered_signed_index_fails_its_signature(small_tree, tmp_path, keys):
    image = tmp_path / "img"
    priv, pub = keys("ed25519")
    pack(small_tree, image, sign_key=priv)
    data = bytearray(image.read_bytes())
    data[inode_at(data, 2) + 16] ^= 1  # an mtime bit, every CRC fixed
    assert fix_index(data)
    image.write_bytes(bytes(data))
    with Image.open(image) as img:
        with pytest.raises(IntegrityError, match="differ from what was signed"):
            img.verify_signature(signing.load_public(pub))
    assert verify_image(image, pub).exit_code == 1


def _flip_last_heap_byte(data: bytearray, record: int) -> None:
    """The last byte of an inode's heap blob: its last xattr's value."""
    heap, heap_len = struct.unpack_from("<QI", data, record + 64)
    data[regions(data)["heap"][0] + heap + heap_len - 1] ^= 1


# (path, what the edit does to that inode's 128-byte record, what it changes)
_POSIX_EDITS = {
    "uid": ("/doc.txt", lambda d, r: struct.pack_into("<I", d, r + 24, 1),
            lambda n: n.uid),
    "gid": ("/bin/chage", lambda d, r: struct.pack_into("<I", d, r + 28, 0),
            lambda n: n.gid),
    "setuid": ("/bin/su", lambda d, r: struct.pack_into("<I", d, r, stat.S_IFREG | 0o755),
               lambda n: n.mode),
    "rdev": ("/dev/sda", lambda d, r: struct.pack_into("<Q", d, r + 48, os.makedev(8, 1)),
             lambda n: n.rdev),
    "user xattr": ("/doc.txt", _flip_last_heap_byte, lambda n: dict(n.xattrs)),
    "capability": ("/bin/ping", _flip_last_heap_byte, lambda n: dict(n.xattrs)),
}


@pytest.mark.parametrize("what", sorted(_POSIX_EDITS))
def test_a_signed_index_covers_owners_modes_devices_and_xattrs(posix_tree, tmp_path, keys,
                                                                what):
    """One owner, mode bit, device number or xattr value changed in the
    index with every CRC fixed: the image still opens and serves the new
    value (no structural check catches it), so only the signature can tell,
    and it does."""
    path, edit, field = _POSIX_EDITS[what]
    priv, pub = keys("ed25519")
    image = tmp_path / "posix.img"
    pack(posix_tree, image, sign_key=priv)
    with Image.open(image) as img:
        node = dict(img.ns.walk())[path.encode()]
        ino, before = node.ino, field(node)
    data = bytearray(image.read_bytes())
    edit(data, inode_at(data, ino))
    assert fix_index(data)
    image.write_bytes(bytes(data))
    with Image.open(image) as img:
        assert field(img.ns.get(ino)) != before
        with pytest.raises(IntegrityError, match="differ from what was signed"):
            img.verify_signature(signing.load_public(pub))
    assert verify_image(image, pub).exit_code == 1


def test_an_index_after_other_records_is_refused(small_tree, tmp_path):
    image = tmp_path / "img"
    pack(small_tree, image)
    with Image.open(image, writable=True) as img:
        img.create_node(ROOT_INO, b"x", stat.S_IFREG | 0o444)
        img._append(RecordType.INDEX, bytes(RawImage(image).body(4096)))
    with pytest.raises(CorruptImage, match="must be the first record"):
        Image.open(image)


def test_old_log_images_still_open(small_tree, tmp_path):
    pack(small_tree, tmp_path / "log.img", index=False)
    with Image.open(tmp_path / "log.img") as img:
        assert img.index is None and img.superblock.version_minor == 0
        assert img.ns.lookup(ROOT_INO, b"text.txt").is_reg


def test_many_inodes_in_little_memory(tmp_path):
    """Building inodes on demand: walking 20,000 files keeps only the recent
    ones (and those in use) in memory."""
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(1000):
            (src / f"d{d}" / f"f{f}").write_bytes(b"x")
    pack(src, tmp_path / "img")
    with Image.open(tmp_path / "img") as img:
        assert sum(1 for _ in img.ns.walk()) == 20021
        assert len(img.ns.inodes.live) <= 4096 + 64
        assert img.totals()["files"] == 20000


def test_many_subdirectories_are_checked_with_their_records_asked_for_at_once(tmp_path,
                                                                            monkeypatch):
    """A directory of 20 subdirectories (index_ns.PREFETCH_FROM or more):
    their records are asked for at once before the parent check reads them
    (up to the last inode, whose next page is past the table), and the check
    still finds a subdirectory whose record names another parent."""
    import errno
    from incfs.format.index import IndexReader
    from incfs.fuse import Listing
    from incfs.index_ns import PREFETCH_FROM
    asked: list[list[int]] = []
    prefetch = IndexReader.prefetch
    monkeypatch.setattr(IndexReader, "prefetch",
                        lambda self, inos: (asked.append(list(inos)), prefetch(self, inos)))
    src = tmp_path / "src"
    for i in range(20):
        (src / "many" / f"s{i:02d}").mkdir(parents=True)
    assert 20 >= PREFETCH_FROM
    pack(src, tmp_path / "img", compress="none")
    data = bytearray((tmp_path / "img").read_bytes())
    with Image.open(tmp_path / "img") as img:
        node = img.ns.lookup(ROOT_INO, b"many")
        listing = Listing.from_records(*img.ns.encoded_listing(node))
        assert listing.types == bytes([stat.S_IFDIR >> 12]) * 20
        assert max(listing.inos) == img.ns.reader.count  # the last record is prefetched too
        assert asked == [listing.inos]
        s07 = img.ns.lookup(node.ino, b"s07").ino
    data[inode_at(data, s07) + 40:inode_at(data, s07) + 48] = ROOT_INO.to_bytes(8, "little")
    assert fix_index(data)
    (tmp_path / "bad.img").write_bytes(bytes(data))
    for encoded in (True, False):
        with Image.open(tmp_path / "bad.img") as img:
            node = img.ns.lookup(ROOT_INO, b"many")
            with pytest.raises(OSError, match="another parent") as exc:
                img.ns.encoded_listing(node) if encoded else img.ns.listing(node)
            assert exc.value.errno == errno.EIO


def _map_tree(src: Path) -> dict[str, bytes]:
    """Files for each map kind (format.maps); returns their contents."""
    src.mkdir()
    noise = os.urandom(3 * 4096)
    files = {
        "raw": noise[:9000],  # raw blocks back to back: a head only (RAW)
        "copy": noise[:9000],  # deduplicated onto "raw", in order: RAW too
        "tiny": noise[:100],  # one short raw block: RAW, no hash map
        "text": b"y" * 5000,  # two zstd blocks: RUN, 2 bytes a block
        "gap": os.urandom(4096) + bytes(4096) + os.urandom(4096),  # a zero block: RUN
        # deduplicated onto "raw"'s blocks 1 and 0: not back to back, FULL
        "shuffled": noise[4096:8192] + noise[:4096],
    }
    for name, body in files.items():
        (src / name).write_bytes(body)
    return files


def _map_bytes(image: Path) -> dict[str, int]:
    """Each file's maps' size in bytes (data and hash), by name."""
    data = image.read_bytes()
    found = regions(data)
    out = {}
    with Image.open(image) as img:
        files = sorted((n.ino, path) for path, n in img.ns.walk() if n.is_reg)
    for k, (ino, path) in enumerate(files):
        start = int.from_bytes(data[inode_at(data, ino) + 48:][:8], "little")
        end = (int.from_bytes(data[inode_at(data, files[k + 1][0]) + 48:][:8], "little")
               if k + 1 < len(files) else found["maps"][1])
        out[os.fsdecode(path).rsplit("/", 1)[-1]] = end - start
    return out


def test_sizes_of_the_index(tmp_path):
    """128 bytes per inode, 16 per name plus the name; block maps of the
    kind the placement allows (docs/format.md, "Block map")."""
    files = _map_tree(tmp_path / "src")
    pack(tmp_path / "src", tmp_path / "img")
    found = regions((tmp_path / "img").read_bytes())
    assert found["inodes"][1] == 7 * 128
    names = sum(map(len, files))
    assert found["names"][1] == 6 * 16 + (names + 7) // 8 * 8
    head = 8
    assert _map_bytes(tmp_path / "img") == {
        "raw": head + head, "copy": head + head, "tiny": head,
        "text": head + 8 + head, "gap": head + 8 + head,
        "shuffled": head + (14 * 2 + 7) // 8 * 8 + head,
    }
    with Image.open(tmp_path / "img") as img:
        assert {os.fsdecode(path).lstrip("/"): img.read_range(n, 0, n.size)
                for path, n in img.ns.walk() if n.is_reg} == files
        assert verify_image(tmp_path / "img").ok


def test_an_index_from_before_map_kinds_is_read(tmp_path, monkeypatch):
    """Maps as three columns without a head (the bit clear): 14 bytes a
    block, read as they always were."""
    import incfs.pack
    from incfs.format.maps import INCOMPAT_MAP_KINDS
    from incfs.pack_index import IndexWriter

    class OldWriter(IndexWriter):
        def __init__(self, tmpdir):
            super().__init__(tmpdir, map_kinds=False)

    files = _map_tree(tmp_path / "src")
    monkeypatch.setattr(incfs.pack, "IndexWriter", OldWriter)
    pack(tmp_path / "src", tmp_path / "img")
    sizes = _map_bytes(tmp_path / "img")
    assert sizes["raw"] == (14 * 3 + 7) // 8 * 8 + 16 and sizes["tiny"] == 16
    with Image.open(tmp_path / "img") as img:
        assert not img.index.header.incompat & INCOMPAT_MAP_KINDS
        assert {os.fsdecode(path).lstrip("/"): img.read_range(n, 0, n.size)
                for path, n in img.ns.walk() if n.is_reg} == files


@pytest.mark.parametrize("map_kinds", [True, False])
def test_a_caches_source_runs_from_map_heads_are_those_a_walk_gives(tmp_path, monkeypatch,
                                                                     map_kinds):
    """The loader's source order (prefetch.source_runs) of an indexed cache
    takes a map that lays its blocks back to back as one run from its head
    (IndexReader.laid_out) and walks only the others: the runs are those of
    walking every decoded map."""
    import incfs.pack
    from incfs.format.layout import Superblock
    from incfs.loader import write_cache
    from incfs.loader.prefetch import source_runs
    from incfs.pack_index import IndexWriter

    class Writer(IndexWriter):
        def __init__(self, tmpdir):
            super().__init__(tmpdir, map_kinds=map_kinds)

    _map_tree(tmp_path / "src")
    monkeypatch.setattr(incfs.pack, "IndexWriter", Writer)
    pack(tmp_path / "src", tmp_path / "img", compress="zstd")
    raw = (tmp_path / "img").read_bytes()
    sb = Superblock.decode(raw[:4096])
    with write_cache(tmp_path / "cache.img", sb, raw[:sb.meta_end]) as cache:
        maps = cache.source_maps
        walked = source_runs({ino: maps[ino] for ino in maps})
        assert source_runs(maps) == walked and len(walked) >= 6
        spans = {name: maps.laid_out(cache.ns.lookup(ROOT_INO, name.encode()).ino)
                 for name in ("raw", "text", "gap", "shuffled", "tiny")}
        assert maps.laid_out(ROOT_INO) is None  # a directory has no maps
        if not map_kinds:
            assert all(s == (None, None) for n, s in spans.items() if n != "tiny")
            return
        assert spans["shuffled"][0] is None
        assert all(spans[n][0] is not None for n in ("raw", "text", "gap", "tiny"))
        assert spans["tiny"][1] == (0, 0) and spans["text"][0][1] == 2


def test_compaction_folds_the_log_into_a_fresh_index(small_tree, tmp_path, keys):
    from incfs.compact import compact
    image = tmp_path / "img"
    pack(small_tree, image)
    with Image.open(image, writable=True) as img:
        ino = img.create_node(ROOT_INO, b"later.txt", stat.S_IFREG | 0o444, size=5,
                              metadata=b"kept", xattrs={b"user.k": b"v"})
        img.fill(ino, [FillBlock(0, b"later")])
        img.unlink(ROOT_INO, b"text.txt")
        # inode numbers change, and a file made without a tree gets one
        before = [r[:1] + r[2:9] + r[10:12] + r[13:] for r in _served(img)]
    priv, pub = keys("ed25519")
    compact(image, sign_key=priv)
    types = [RecordType(h.type) for _o, h in RawImage(image).records()]
    assert types == [RecordType.INDEX, RecordType.SIGNATURE, RecordType.PAD, RecordType.DATA]
    with Image.open(image) as img:
        assert [r[:1] + r[2:9] + r[10:12] + r[13:] for r in _served(img)] == before
        assert not img.changed_since_signature()
    assert verify_image(image, pub).exit_code == 0


def test_compaction_refuses_an_incomplete_image(tmp_path):
    from incfs.compact import compact
    from incfs.errors import UsageError
    with Image.create(tmp_path / "img") as img:
        img.create_node(ROOT_INO, b"f", stat.S_IFREG | 0o444, size=10)
    with pytest.raises(UsageError, match="not complete"):
        compact(tmp_path / "img")


def _listing_tree(root: Path) -> Path:
    """One directory of every type and of names on each side of the
    8-byte padding; its children are not numbered consecutively."""
    (root / "d" / "sub").mkdir(parents=True)
    for name in ("a", "1234567", "12345678", "123456789", "x" * 255, "\xe9t\xe9"):
        (root / "d" / name).write_bytes(b"")
    os.symlink("a", root / "d" / "link")
    os.mkfifo(root / "d" / "fifo")
    (root / "e").mkdir()
    return root


def _listing_of(path: Path, name: bytes) -> tuple:
    img = Image.open(path)
    node = img.ns.lookup(ROOT_INO, name)
    names, children, types, _lengths = img.ns.listing(node)
    expected = [stat.S_IFMT(img.ns.inodes[c].mode) >> 12 for c in children]
    return list(names), list(children), list(types), expected


def test_a_listing_is_the_name_block_whatever_the_order_of_its_names(tmp_path):
    """The format lets a writer place a block's names anywhere after its
    table: names stored in reverse list the same as names back to back."""
    pack(_listing_tree(tmp_path / "src"), tmp_path / "img", compress="none")
    names, children, types, expected = _listing_of(tmp_path / "img", b"d")
    assert names == sorted(os.fsencode(n) for n in os.listdir(tmp_path / "src" / "d"))
    assert types == expected
    data = bytearray((tmp_path / "img").read_bytes())
    d_ino = Image.open(tmp_path / "img").ns.lookup(ROOT_INO, b"d").ino
    base = regions(data)["names"][0] + int.from_bytes(
        data[inode_at(data, d_ino) + 48:][:8], "little")
    count = len(names)
    table = [(int.from_bytes(data[base + 16 * i:][:4], "little"), data[base + 16 * i + 4])
             for i in range(count)]
    stored = [bytes(data[base + off:base + off + n]) for off, n in table]
    pos = base + 16 * count
    for i in reversed(range(count)):  # rewrite the names last to first
        data[pos:pos + len(stored[i])] = stored[i]
        data[base + 16 * i:base + 16 * i + 4] = (pos - base).to_bytes(4, "little")
        pos += len(stored[i])
    assert table[0][0] < table[1][0]  # back to back as pack wrote them, now reversed:
    assert fix_index(data)
    (tmp_path / "reversed.img").write_bytes(bytes(data))
    assert _listing_of(tmp_path / "reversed.img", b"d") == (names, children, types, expected)
    # the records made straight from a block (incfs.block_dirents) take
    # names back to back only: the reversed block is listed name by name
    for img_name, encoded in (("img", True), ("reversed.img", False)):
        with Image.open(tmp_path / img_name) as img:
            node = img.ns.lookup(ROOT_INO, b"d")
            assert (img.ns.encoded_listing(node) is not None) == encoded


def _without_stored_types(data: bytearray) -> None:
    """Make a packed image what a writer before DTYPES wrote: the compat bit
    clear and byte 5 of every name entry zero (all else is the same)."""
    from incfs.format.index import COMPAT_DTYPES, INODE_SIZE
    from incfs.testing.index_edit import set_header_field
    names_at, _ = regions(data)["names"]
    inodes_at, inodes_len = regions(data)["inodes"]
    for at in range(inodes_at, inodes_at + inodes_len, INODE_SIZE):
        mode = int.from_bytes(data[at:at + 4], "little")
        if stat.S_ISDIR(mode):
            base = names_at + int.from_bytes(data[at + 48:at + 56], "little")
            for entry in range(int.from_bytes(data[at + 56:at + 60], "little")):
                data[base + entry * 16 + 5] = 0
    compat = int.from_bytes(data[4096 + 32 + 12:][:4], "little")
    set_header_field(data, 12, "<I", compat & ~COMPAT_DTYPES)


def _seen(mnt: Path) -> list[tuple]:
    """Each entry as a walk sees it: the d_type-based answers of scandir
    (no stat: the types READDIR gave), then lstat's."""
    out = []
    for top, dirs, files in os.walk(mnt):
        with os.scandir(top) as it:
            for e in sorted(it, key=lambda e: e.name):
                st = os.lstat(e.path)
                out.append((os.path.relpath(e.path, mnt), e.inode(), e.is_dir(follow_symlinks=False),
                            e.is_file(follow_symlinks=False), e.is_symlink(),
                            stat.S_IFMT(st.st_mode), st.st_ino))
    return out


@needs_fuse
def test_images_with_and_without_stored_types_list_the_same(tmp_path, monkeypatch):
    """A packed index stores each name's d_type (DTYPES); an image written
    before (bit clear, bytes zero) still opens and lists the same types,
    taken from the inode records, on a real mount; and so with either
    encoder of listings."""
    from incfs import block_dirents
    from incfs.control import Client
    from incfs.format.index import COMPAT_DTYPES
    from incfs.mount import MountConfig, mount_background, umount
    src = _listing_tree(tmp_path / "src")
    os.mkfifo(src / "fifo")
    pack(src, tmp_path / "new.img", compress="none")
    data = bytearray((tmp_path / "new.img").read_bytes())
    assert int.from_bytes(data[4096 + 32 + 12:][:4], "little") & COMPAT_DTYPES
    _without_stored_types(data)
    (tmp_path / "old.img").write_bytes(bytes(data))
    with Image.open(tmp_path / "old.img") as img:
        assert not img.ns.reader.stored_types
    seen, encoders = {}, {}
    # each image with the C encoder of name blocks and with the Python one
    # (incfs.block_dirents; INCFS_NO_NATIVE: the daemon leaves the C one unused)
    for name, encoder in (("new", "c"), ("old", "c"), ("new", "python"), ("old", "python")):
        mnt = tmp_path / f"mnt-{name}-{encoder}"
        mnt.mkdir()
        monkeypatch.setenv("INCFS_NO_NATIVE", "1" if encoder == "python" else "")
        mount_background(MountConfig(source=str(tmp_path / f"{name}.img"), mountpoint=str(mnt),
                                     allow_unsigned=True))
        try:
            seen[name, encoder] = _seen(mnt)
            with Client.connect(mnt) as client:
                encoders[name, encoder] = client.status()["fuse"]["listing_encoder"]
        finally:
            umount(str(mnt))
    if block_dirents.NATIVE is None:
        encoders["new", "c"] = encoders["old", "c"] = "c"  # not built: both were Python
    assert all(got == encoder for (_name, encoder), got in encoders.items()), encoders
    assert len({tuple(walk) for walk in seen.values()}) == 1, "the four walks differ"
    seen["new"] = seen["new", "c"]
    kinds = {kind for *_, kind, _ino in seen["new"]}
    assert kinds == {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO}
    assert sorted(p for p, *_ in seen["new"]) == sorted(
        os.path.relpath(os.path.join(top, n), src)
        for top, dirs, files in os.walk(src) for n in dirs + files)


def test_getxattr_of_a_file_without_xattrs_builds_no_inode(posix_tree, tmp_path):
    """`ls -l` asks every file for security.selinux: a file whose record
    stores no attributes is answered ENODATA from the record alone (no inode
    built), one that stores some from its inode, and incfs's own names
    still answer for either."""
    from incfs.fuse.ops import Context, FuseError
    from incfs.fusefs import IncfsOperations
    from incfs.service import Service

    pack(posix_tree, tmp_path / "img", compress="none")
    with Image.open(tmp_path / "img") as img:
        ns = img.ns
        assert isinstance(ns, IndexNamespace)
        ops = IncfsOperations(Service(img, None), str(tmp_path / "ctl.sock"))
        ctx = Context(0, 0, os.getpid(), 1)
        root = ns.inodes[ROOT_INO]
        bin_dir = ns.inodes[root.children[b"bin"]]
        su, ping = bin_dir.children[b"su"], bin_dir.children[b"ping"]
        del bin_dir, root
        assert su not in ns.inodes.live and ping not in ns.inodes.live
        with pytest.raises(FuseError) as no_data:
            ops.getxattr(su, b"security.selinux", ctx)
        assert no_data.value.errno == errno.ENODATA
        assert su not in ns.inodes.live  # answered from the record
        with pytest.raises(FuseError):
            ops.getxattr(ping, b"security.selinux", ctx)
        assert ops.getxattr(ping, b"security.capability", ctx) == \
            os.getxattr(posix_tree / "bin" / "ping", "security.capability")
        assert ops.getxattr(su, b"user.incfs.blocks", ctx) == b"1/1"
