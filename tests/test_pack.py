"""pack: directory -> image, read back byte for byte through the library."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import (CAPABILITY, MiB, assert_image_matches, build_sample_tree,
                      source_entries, xattrs_of)
from incfs import BLOCK_SIZE
from incfs.errors import IntegrityError, UsageError
from incfs.format.records import BlockKind, info_kind, info_size
from incfs.image import Image
from incfs.integrity import signing
from incfs.pack import pack
from incfs.verify import verify_image


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory) -> Path:
    return build_sample_tree(tmp_path_factory.mktemp("big") / "tree", big=50 * MiB, deep=40)


def _kinds(img: Image) -> dict[BlockKind, int]:
    out = {k: 0 for k in BlockKind}
    for node in img.ns.inodes.values():
        if node.data is not None:
            for _i, _off, info, _crc in node.data.entries():
                out[info_kind(info)] += 1
    return out


@pytest.mark.parametrize("compress", ["none", "lz4", "zstd"])
def test_round_trip(big_tree, tmp_path, compress):
    image = tmp_path / f"tree-{compress}.img"
    stats = pack(big_tree, image, compress=compress)
    regular = {(st.st_dev, st.st_ino): st for st in source_entries(big_tree).values()
               if stat.S_ISREG(st.st_mode)}
    assert stats.files == len(regular) and stats.symlinks == 4
    assert stats.bytes_in == sum(st.st_size for st in regular.values())
    with Image.open(image) as img:
        assert_image_matches(img, big_tree)
        kinds = _kinds(img)
        assert kinds[BlockKind.ZERO] > 0  # zero MiBs of big.bin, "zeros", "mixed"
        assert kinds[BlockKind.RAW] > 0  # random data never shrinks
        if compress == "none":
            assert kinds[BlockKind.LZ4] == kinds[BlockKind.ZSTD] == 0
        elif compress == "lz4":
            assert kinds[BlockKind.LZ4] > 0 and kinds[BlockKind.ZSTD] == 0
        else:
            assert kinds[BlockKind.ZSTD] > 0 and kinds[BlockKind.LZ4] == 0
        for node in img.ns.inodes.values():
            for bmap in (node.data, node.hashes):
                for _i, offset, info, _crc in (bmap.entries() if bmap else ()):
                    kind = info_kind(info)
                    if kind is BlockKind.ZERO:
                        assert info_size(info) == 0
                    elif kind is BlockKind.RAW and info_size(info) == BLOCK_SIZE:
                        assert offset % BLOCK_SIZE == 0  # EROFS can map full raw blocks in place
        # hard links are one inode under each name
        _p, a = next((p, n) for p, n in img.ns.walk() if p == b"/text.txt")
        _p, b = next((p, n) for p, n in img.ns.walk() if p == b"/links/hard-a")
        assert a.ino == b.ino and a.nlink == 2
    report = verify_image(image)
    assert report.ok and report.complete and report.exit_code == 0, report.problems


def test_compression_saves_space(big_tree, tmp_path):
    sizes = {c: pack(big_tree, tmp_path / c, compress=c).bytes_stored for c in ("none", "zstd")}
    assert sizes["zstd"] < sizes["none"] * 0.8
    # zero blocks take no space: the 12.5 MiB of zeros in big.bin are not stored
    assert sizes["none"] < 40 * MiB


def test_identical_blocks_are_stored_once(small_tree, tmp_path):
    image = tmp_path / "img"
    stats = pack(small_tree, image, compress="none")
    assert stats.dedup_blocks >= 4  # dup2 repeats dup1 (4 blocks)
    with Image.open(image) as img:
        nodes = {p: n for p, n in img.ns.walk()}
        d1, d2 = nodes[b"/dup1"], nodes[b"/dup2"]
        assert d1.ino != d2.ino
        assert [e[1] for e in d1.data.entries()] == [e[1] for e in d2.data.entries()]
        assert img.read_range(d2, 0, d2.size) == (small_tree / "dup2").read_bytes()


def test_pack_with_base_reuses_blocks(tmp_path, sample_tree):
    old_src = sample_tree(big=2 * MiB, deep=3)
    old = tmp_path / "old.img"
    pack(old_src, old, compress="lz4")
    new_src = tmp_path / "new"
    shutil.copytree(old_src, new_src, symlinks=True)
    with open(new_src / "big.bin", "r+b") as f:
        f.seek(5 * BLOCK_SIZE)
        f.write(b"changed")
    (new_src / "added.txt").write_bytes(b"new file\n" * 100)
    new = tmp_path / "new.img"
    stats = pack(new_src, new, compress="zstd", base=old)
    assert stats.base_reused > 0
    with Image.open(new) as img:
        assert_image_matches(img, new_src)
        # reused blocks keep the base's lz4 encoding: no recompression
        assert _kinds(img)[BlockKind.LZ4] > 0


def test_profile_orders_blocks(sample_tree, tmp_path):
    src = sample_tree(big=1 * MiB, deep=2)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"version": 1, "blocks": [
        ["big.bin", 200], ["/big.bin", 7], ["edge-4097", 1], ["missing", 0], ["big.bin", 9999]]}))
    image = tmp_path / "img"
    pack(src, image, compress="none", profile=profile)
    with Image.open(image) as img:
        nodes = {p: n for p, n in img.ns.walk()}
        big, edge = nodes[b"/big.bin"], nodes[b"/edge-4097"]
        hot = [big.data.get(200)[0], big.data.get(7)[0], edge.data.get(1)[0]]
        assert hot == sorted(hot)  # in profile order
        hash_offsets = [o for n in img.ns.inodes.values() if n.hashes
                        for _i, o, _f, _c in n.hashes.entries()]
        cold = [o for n in img.ns.inodes.values() if n.data
                for i, o, info, _c in n.data.entries()
                if info_kind(info) is not BlockKind.ZERO and o not in hot]
        assert max(hash_offsets) < min(hot)  # hash trees first
        assert max(hot) < min(cold)  # then profiled blocks, then the rest
        assert min(hash_offsets) == img.superblock.data_start
        assert_image_matches(img, src)


def test_pack_refuses_bad_input(tmp_path, small_tree, keys):
    existing = tmp_path / "exists.img"
    existing.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists"):
        pack(small_tree, existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="not a directory"):
        pack(tmp_path / "missing", tmp_path / "a.img")
    with pytest.raises(UsageError, match="compression"):
        pack(small_tree, tmp_path / "b.img", compress="gzip")
    _priv, pub = keys("ed25519")
    with pytest.raises(UsageError, match="private key"):
        pack(small_tree, tmp_path / "c.img", sign_key=pub)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.img"]


def test_failed_pack_leaves_nothing(tmp_path, sample_tree, monkeypatch):
    src = sample_tree(big=0, deep=2)
    real_open = open

    def failing_open(file, *args, **kwargs):
        if str(file).endswith("edge-4096"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="cannot read .*edge-4096"):
        pack(src, out / "tree.img")
    assert list(out.iterdir()) == []


# --- scale -------------------------------------------------------------------------

_PACK = textwrap.dedent("""
    import json, resource, sys, time
    from incfs.pack import pack
    t = time.perf_counter()
    stats = pack(sys.argv[1], sys.argv[2], compress="zstd")
    # VmHWM, not ru_maxrss: the latter survives exec, so it would be pytest's own
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print(json.dumps({"seconds": time.perf_counter() - t, "files": stats.files,
                      "peak_rss_kib": hwm}))
""")

_OPEN = textwrap.dedent("""
    import json, resource, sys, time
    from incfs.image import Image
    t = time.perf_counter()
    img = Image.open(sys.argv[1])
    seconds = time.perf_counter() - t
    node = img.ns.lookup(img.ns.lookup(1, b"d999").ino, b"f900")
    data = img.read_range(node, 0, 100)
    totals = img.totals()
    index = img.index.header.regions if img.index else {}
    print(json.dumps({"seconds": seconds, "inodes": len(img.ns), "files": totals["files"],
                      "sample": data.decode(), "minor": img.superblock.version_minor,
                      "index_bytes": sum(r.length for r in index.values()),
                      "built": len(img.ns.inodes.live) if img.index else None,
                      "peak_rss_kib": [int(l.split()[1]) for l in open("/proc/self/status")
                                       if l.startswith("VmHWM:")][0]}))
""")


def _scratch_dir(tmp_path: Path) -> Path:
    """tmpfs when it has room for a million inodes (creating them is ~3x
    faster there), else the test's own directory."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_favail > 1_200_000 and st.f_bavail * st.f_frsize > 2 << 30:
            return Path(os.path.join(shm, f"incfs-test-{os.getpid()}"))
    except OSError:
        pass
    return tmp_path / "million"


@pytest.mark.slow
def test_million_files(tmp_path, capsys):
    src = _scratch_dir(tmp_path)
    src.mkdir()
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "incfs.testing.smalltree", str(src), "1000"],
                       check=True)
        created = time.perf_counter() - t0
        image = tmp_path / "million.img"
        packed = json.loads(subprocess.run([sys.executable, "-c", _PACK, str(src), str(image)],
                                           check=True, capture_output=True, text=True).stdout)
        opened = json.loads(subprocess.run([sys.executable, "-c", _OPEN, str(image)],
                                           check=True, capture_output=True, text=True).stdout)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    assert packed["files"] == 1_000_000
    assert opened["files"] == 1_000_000
    assert opened["inodes"] == 1_000_000 + 1000 + 1
    assert opened["sample"] == "file 999/900\n"
    # format 1.2: the index answers; opening and one lookup built a handful of inodes
    assert opened["minor"] == 2 and opened["built"] < 10
    # issue 11's memory bounds: pack <= 256 MiB; the daemon's budget, 64 MiB +
    # 64 B an inode (+ 16 B a block, none here), checked on an open and one
    # read (the mounted walks: bench/metadata_scale.py, with the times)
    assert packed["peak_rss_kib"] <= 256 * 1024, packed
    assert opened["peak_rss_kib"] * 1024 <= 64 * MiB + 64 * opened["inodes"], opened
    size = image.stat().st_size
    with capsys.disabled():
        print(f"\n[1M files] create {created:.1f} s; pack {packed['seconds']:.1f} s, "
              f"peak RSS {packed['peak_rss_kib'] / 1024:.0f} MiB; open "
              f"{opened['seconds']:.1f} s, peak RSS {opened['peak_rss_kib'] / 1024:.0f} MiB; "
              f"image {size / MiB:.1f} MiB (index {opened['index_bytes'] / MiB:.1f} MiB) "
              f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
              " MiB)")


def test_pack_into_its_own_source(tmp_path):
    """The temporary image lives beside the target; when that is inside the
    source tree it must not be packed as a stray empty file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hi\n")
    stats = pack(src, src / "self.img")
    assert stats.files == 1
    with Image.open(src / "self.img") as img:
        assert [p for p, _n in img.ns.walk()] == [b"", b"/a"]


def _walked(img: Image) -> list[tuple]:
    return [(path, n.ino, n.mode, n.nlink, n.parent, n.file_id, n.target,
             img.read_range(n, 0, n.size) if n.is_reg else b"") for path, n in img.ns.walk()]


def test_directory_walk_numbers_like_a_tree(tmp_path):
    """A directory is numbered as it is listed, a tar through a tree; both
    give each inode the same number, and a hard link's inode goes to its
    first name in inode order even when a later-listed directory holds it
    (a/sub is listed after the root's own files, but numbered before b)."""
    src = tmp_path / "src"
    (src / "a" / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "b").write_bytes(b"b" * 5000)
    (src / "a" / "x").write_bytes(b"x")
    (src / "z").write_bytes(b"")
    os.link(src / "b", src / "a" / "sub" / "hard_b")
    os.link(src / "z", src / "a" / "hard_z")
    os.link(src / "z", src / "zz")
    os.symlink("../b", src / "a" / "sym")
    tar = tmp_path / "src.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(tar), "."], check=True)
    pack(src, tmp_path / "dir.img")
    stats = pack(tar, tmp_path / "tar.img")
    assert stats.hard_links == 3
    with Image.open(tmp_path / "dir.img") as d, Image.open(tmp_path / "tar.img") as t:
        assert _walked(d) == _walked(t)
        node = dict(d.ns.walk())
        assert node[b"/a/sub/hard_b"].ino == node[b"/b"].ino < node[b"/a/x"].ino
        assert node[b"/b"].nlink == 2 and node[b"/zz"].nlink == 3


def test_directory_pack_holds_only_the_open_listings(tmp_path, monkeypatch):
    """Packing a directory builds no tree, and the index writer holds the
    listings of the directories on the walk's path only: memory follows the
    tree's depth and width, not its size (1M files: docs/performance.md)."""
    import incfs.inputs.tree as tree_mod
    import incfs.pack_index as pack_index

    src = tmp_path / "src"
    for d in range(6):
        for sub in range(3):
            (src / f"d{d}" / f"s{sub}").mkdir(parents=True)
            for f in range(20):
                (src / f"d{d}" / f"s{sub}" / f"f{f}").write_bytes(b"%d" % f if f % 5 else b"")
    trees, most_open = [0], [0]
    tree_init, reserve = tree_mod.Tree.__init__, pack_index.IndexWriter._reserve_names

    def counting_init(self, *args, **kw):
        trees[0] += 1
        tree_init(self, *args, **kw)

    def watching_reserve(self, ino, names):
        out = reserve(self, ino, names)
        most_open[0] = max(most_open[0], len(self.open))
        return out

    monkeypatch.setattr(tree_mod.Tree, "__init__", counting_init)
    monkeypatch.setattr(pack_index.IndexWriter, "_reserve_names", watching_reserve)
    stats = pack(src, tmp_path / "out.img")
    assert stats.files == 6 * 3 * 20
    assert trees[0] == 0
    assert most_open[0] <= 3  # the root, a d*, an s*: the path's depth
    with Image.open(tmp_path / "out.img") as img:
        assert img.read_range(dict(img.ns.walk())[b"/d5/s2/f19"], 0, 9) == b"19"


# --- POSIX fidelity (format 1.1) ---------------------------------------------------

def _assert_posix_matches(img: Image, src: Path) -> None:
    """Every field of every entry round-trips: type and whole mode, owners,
    device numbers, mtime to the nanosecond, xattrs, hard links, data."""
    entries = source_entries(src)
    in_image = {p: n for p, n in img.ns.walk() if p}
    assert set(in_image) == set(entries)
    by_source_inode: dict[tuple[int, int], set[int]] = {}
    for path, st in [(b"", os.lstat(src)), *entries.items()]:
        node = img.ns.get(1) if not path else in_image[path]
        full = os.fsencode(src) + path
        if stat.S_ISLNK(st.st_mode):
            assert node.mode == stat.S_IFLNK | 0o777, path
            assert node.target == os.readlink(full)
        else:
            assert node.mode == st.st_mode, (path, oct(node.mode), oct(st.st_mode))
        assert (node.uid, node.gid) == (st.st_uid, st.st_gid), path
        assert node.mtime_ns == st.st_mtime_ns, path
        want_rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
        assert node.rdev == want_rdev, path
        assert dict(node.xattrs) == xattrs_of(Path(os.fsdecode(full))), path
        if not stat.S_ISDIR(st.st_mode):
            by_source_inode.setdefault((st.st_dev, st.st_ino), set()).add(node.ino)
            assert node.nlink == st.st_nlink, path
        if stat.S_ISREG(st.st_mode):
            assert img.read_range(node, 0, st.st_size + 1) == Path(os.fsdecode(full)).read_bytes()
    groups = list(by_source_inode.values())
    assert all(len(g) == 1 for g in groups)
    assert len({next(iter(g)) for g in groups}) == len(groups)


def test_posix_metadata_round_trips(posix_tree, tmp_path, keys):
    priv, pub = keys("ed25519")
    image = tmp_path / "posix.img"
    stats = pack(posix_tree, image, sign_key=priv)
    assert (stats.devices, stats.fifos, stats.sockets) == (3, 1, 1)
    assert stats.hard_links == 2 and not stats.skipped
    with Image.open(image) as img:
        _assert_posix_matches(img, posix_tree)
        assert img.superblock.version_minor == 2 and img.ns.posix  # 1.2: indexed
        cap = img.ns.lookup(img.ns.lookup(1, b"bin").ino, b"ping")
        assert cap.xattrs[b"security.capability"] == CAPABILITY
        null = img.ns.lookup(img.ns.lookup(1, b"dev").ino, b"null")
        assert (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
        assert null.is_device and null.data is None and null.nlink == 2
        img.verify_signature(signing.load_public(pub))
    report = verify_image(image, pub)
    assert report.exit_code == 0, [str(p) for p in report.problems]


def test_posix_image_survives_reopen_writable_and_entry_copy(posix_tree, tmp_path):
    """Inode.entry() (what loaders copy) keeps every field."""
    image = tmp_path / "posix.img"
    pack(posix_tree, image)
    with Image.open(image) as img:
        for _p, node in img.ns.walk():
            e = node.entry()
            assert (e.uid, e.gid, e.rdev, dict(e.xattrs), e.mode) == (
                node.uid, node.gid, node.rdev, dict(node.xattrs), node.mode)
    with Image.open(image, writable=True) as img:
        ino = img.create_node(1, b"added", stat.S_IFIFO | 0o640, uid=7, gid=8,
                              xattrs={b"user.k": b"v"})
    with Image.open(image) as img:
        node = img.ns.get(ino)
        assert (node.uid, node.gid, dict(node.xattrs)) == (7, 8, {b"user.k": b"v"})


def test_signature_covers_owners_devices_and_xattrs(posix_tree, tmp_path, keys, raw_image):
    """Change one uid, one device number or one xattr value (with a valid
    CRC): only the signature can tell, and it does."""
    from incfs.format import records as R
    from incfs.format.layout import RecordType
    priv, pub = keys("ed25519")
    image = tmp_path / "posix.img"
    pack(posix_tree, image, sign_key=priv, index=False)  # edits INODES2 records
    def flip_last(value: bytes) -> bytes:
        return value[:-1] + bytes([value[-1] ^ 1])

    edits = {  # what to change, in the first inode that has it (same record size)
        "uid": (lambda e: e.uid, lambda e: setattr(e, "uid", e.uid ^ 1)),
        "rdev": (lambda e: e.rdev, lambda e: setattr(e, "rdev", e.rdev ^ 1)),
        "xattr": (lambda e: any(v for _n, v in e.xattrs),
                  lambda e: setattr(e, "xattrs", tuple((n, flip_last(v) if v else v)
                                                       for n, v in e.xattrs))),
    }
    for what, (has, edit) in edits.items():
        raw = raw_image(image)
        offset, _h = raw.of_type(RecordType.INODES2)[0]
        entries = R.decode_inodes2(raw.body(offset))
        edit(next(e for e in entries if has(e)))
        raw.set_body(offset, R.encode_inodes2(entries))
        tampered = raw.save(tmp_path / f"tampered-{what}.img")
        with Image.open(tampered) as img:
            with pytest.raises(IntegrityError, match="differ from what was signed"):
                img.verify_signature(signing.load_public(pub))
        assert verify_image(tampered, pub).exit_code == 1, what


def test_posix_inspect_json(posix_tree, tmp_path):
    from incfs.verify import describe_image
    image = tmp_path / "posix.img"
    pack(posix_tree, image)
    info = describe_image(image)
    assert info["format_version"] == "1.2"
    assert (info["counts"]["devices"], info["counts"]["fifos"],
            info["counts"]["sockets"]) == (3, 1, 1)
    by_path = {e["path"]: e for e in info["tree"]}
    assert by_path["/dev/null"]["type"] == "chardev" and by_path["/dev/null"]["rdev"] == [1, 3]
    assert by_path["/bin/su"]["mode"] == "4755" and by_path["/tmp"]["mode"] == "1777"
    assert (by_path["/doc.txt"]["uid"], by_path["/doc.txt"]["gid"]) == (70000, 4000000000)
    assert by_path["/doc.txt"]["xattrs"]["user.mime_type"] == "text/plain"
    assert by_path["/bin/ping"]["xattrs"]["security.capability"].startswith("0x")


def test_plain_tree_still_writes_a_1_0_log(small_tree, tmp_path):
    """The log layout (index=False), no owners, devices or xattrs: INODES
    records and the v1 root, so a 1.0 reader still opens the image."""
    from incfs.format.layout import RecordType
    from conftest import RawImage
    image = tmp_path / "plain.img"
    pack(small_tree, image, index=False)
    raw = RawImage(image)
    assert raw.of_type(RecordType.INODES) and not raw.of_type(RecordType.INODES2)
    with Image.open(image) as img:
        assert img.superblock.version_minor == 0 and not img.ns.posix


def test_cache_built_by_the_loader_keeps_posix_metadata(posix_tree, tmp_path):
    """The loader copies the metadata region record by record into a cache
    (re-typing only BLOCKS): INODES2 records and the v2 root come along."""
    from incfs.format.layout import Superblock
    from incfs.loader import write_cache
    image = tmp_path / "posix.img"
    pack(posix_tree, image)
    raw = image.read_bytes()
    sb = Superblock.decode(raw[:BLOCK_SIZE])
    write_cache(tmp_path / "cache.img", sb, raw[:sb.meta_end]).close()
    with Image.open(tmp_path / "cache.img") as cache, Image.open(image) as img:
        assert cache.canonical_root() == img.canonical_root()
        theirs = [(p, n.mode, n.uid, n.gid, n.rdev, dict(n.xattrs), n.nlink)
                  for p, n in cache.ns.walk()]
        ours = [(p, n.mode, n.uid, n.gid, n.rdev, dict(n.xattrs), n.nlink)
                for p, n in img.ns.walk()]
        assert theirs == ours
