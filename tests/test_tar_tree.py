"""The compact tree that tar and OCI inputs build (`inputs.tree`) against a
plain model of its rules, the fast tar header parse against tarfile's, and
what a tar input holds per entry."""

from __future__ import annotations

import json
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from incfs.errors import UsageError
from incfs.image import Image
from incfs.inputs import Entry, Tree
from incfs.inputs import tar_header
from incfs.inputs.tree import ROOT
from incfs.pack import pack
from incfs.testing.smalltree import make_tree
from test_inputs import T0, OciLayout, member, tar_bytes

# --- the tree against a model ------------------------------------------------------


class _Model:
    """The rules of `inputs.tree` written the plain way (a dict per
    directory, an object per inode), as the tree was before it was compact."""

    def __init__(self):
        self.root = {"entry": None, "children": {}}

    def add(self, e: Entry) -> None:
        *dirs, name = e.path.split(b"/")
        cur = self.root
        for part in dirs:
            child = cur["children"].get(part)
            if child is None:
                child = cur["children"][part] = {"entry": None, "children": {}}
            elif child["children"] is None:
                raise UsageError("is not a directory")
            cur = child
        existing = cur["children"].get(name)
        if e.link is not None:
            target = self.lookup(e.link)
            if target is None or target["children"] is not None:
                raise UsageError("bad link")
            cur["children"][name] = target
        elif existing is not None and existing["children"] is not None and e.is_dir:
            existing["entry"] = e
        else:
            cur["children"][name] = {"entry": e, "children": {} if e.is_dir else None}

    def lookup(self, path: bytes):
        cur = self.root
        for part in path.split(b"/"):
            if cur["children"] is None or part not in cur["children"]:
                return None
            cur = cur["children"][part]
        return cur

    def walk(self) -> list[tuple[bytes, int, int]]:
        """(path, mode, the first path of its inode) in byte order."""
        out, first = [], {}
        stack = [(b"", self.root)]
        while stack:
            path, node = stack.pop()
            mode = node["entry"].mode if node["entry"] else stat.S_IFDIR | 0o755
            out.append((path, mode, first.setdefault(id(node), path)))
            for name in sorted(node["children"] or (), reverse=True):
                stack.append((path + b"/" + name if path else name, node["children"][name]))
        return out


def _tree_walk(tree: Tree) -> list[tuple[bytes, int, int]]:
    out, first = [], {}
    stack = [(b"", ROOT)]
    while stack:
        path, node = stack.pop()
        node = tree.inode(node)
        out.append((path, tree.entry(node).mode, first.setdefault(node, path)))
        if tree.is_dir(node):
            for name, child in reversed(tree.children(node)):
                stack.append((path + b"/" + name if path else name, child))
    return out


def _random_entry(rng: random.Random, n: int) -> Entry:
    # few names at each level, so paths collide: replacements, files under
    # files, links to what was replaced
    path = b"/".join(b"%d" % rng.randrange(4 if depth < 2 else 400)
                     for depth in range(rng.randrange(1, 4)))
    roll = rng.random()
    if roll < 0.3:
        return Entry(path, stat.S_IFDIR | (0o700 + n % 64), origin=str(n))
    if roll < 0.38:
        link = b"/".join(b"%d" % rng.randrange(4 if d < 2 else 400) for d in range(3))
        return Entry(path, stat.S_IFREG, link=link, origin=str(n))
    return Entry(path, stat.S_IFREG | 0o600, size=n, mtime_ns=n, origin=str(n))


@pytest.mark.parametrize("seed", range(3))
def test_tree_follows_the_models_rules(seed):
    """Thousands of random entries (past the hash table's first growth):
    the same tree, the same errors, hard links sharing the same inodes."""
    rng = random.Random(seed)
    model, tree = _Model(), Tree()
    errors = 0
    for n in range(12_000):
        e = _random_entry(rng, n)
        try:
            model.add(e)
        except UsageError:
            errors += 1
            with pytest.raises(UsageError):
                tree.add(e)
            continue
        tree.add(e)
    assert len(tree) > 4096  # the hash table grew at least once
    assert errors > 0
    assert _tree_walk(tree) == model.walk()


def test_a_replaced_directory_is_forgotten_with_its_paths():
    """A directory replaced by a file takes the paths under it along,
    including the ones found through the tree's cache of directories."""
    tree = Tree()
    tree.add(Entry(b"d/x", stat.S_IFREG))
    tree.add(Entry(b"d", stat.S_IFREG))
    with pytest.raises(UsageError, match="'d' is not a directory"):
        tree.add(Entry(b"d/y", stat.S_IFREG))
    assert tree.lookup(b"d/x") == -1 and not tree.is_dir(tree.lookup(b"d"))


def test_deep_paths_need_no_recursion():
    tree = Tree()
    deep = b"/".join([b"a"] * 2000)
    tree.add(Entry(deep, stat.S_IFREG))
    assert tree.lookup(deep) > 0 and tree.lookup(deep.rpartition(b"/")[0]) > 0


def test_oci_deleted_directory_comes_back_empty(tmp_path):
    """A whiteout of a directory, then the same directory implied by a
    later layer: what the lower layer had in it stays deleted."""
    layout = OciLayout(tmp_path / "oci")
    layout.image([
        tar_bytes([member("d/old", data=b"old"), member("d/sub/deep", data=b"deep"),
                   member("keep", data=b"k")]),
        tar_bytes([member(".wh.d")]),
        tar_bytes([member("d/new", data=b"new")]),
    ], compress="")
    image = tmp_path / "oci.img"
    pack(f"oci:{layout.root}:latest", image)
    with Image.open(image) as img:
        paths = {p for p, _n in img.ns.walk()}
        assert paths == {b"", b"/d", b"/d/new", b"/keep"}
        assert img.read_range(img.ns.lookup(img.ns.lookup(1, b"d").ino, b"new"), 0, 9) == b"new"


# --- the fast header parse ----------------------------------------------------------

_FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname",
           "uname", "gname", "devmajor", "devminor")


def _parse(parser, block: bytes):
    try:
        info = parser(block)
    except Exception as e:  # noqa: BLE001 - the kind of failure is what is compared
        return type(e).__name__
    return tuple(getattr(info, f) for f in _FIELDS)


def _both(block: bytes) -> tuple:
    fast = _parse(lambda b: tar_header.frombuf(tarfile.TarInfo, b, "utf-8", "surrogateescape"),
                  block)
    slow = _parse(lambda b: tarfile.TarInfo.frombuf(b, "utf-8", "surrogateescape"), block)
    return fast, slow


def _blocks() -> list[bytes]:
    members = [member("plain", data=b"x" * 700), member("dir/", tarfile.DIRTYPE),
               member("p" * 90 + "/" + "q" * 90, data=b"split into prefix"),
               member("l" * 300, data=b"long"), member("ünï/cøde", data=b"u"),
               member("sym", tarfile.SYMTYPE, linkname="t" * 99),
               member("hard", tarfile.LNKTYPE, linkname="plain"),
               member("dev", tarfile.CHRTYPE, devmajor=8, devminor=1 << 20),
               member("big-ids", data=b"", uid=1 << 40, gid=3, mtime=-5),
               member("fifo", tarfile.FIFOTYPE)]
    blocks = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        usable = [m for m in members if fmt != tarfile.USTAR_FORMAT or
                  (len(m[0].name) < 100 or "/" in m[0].name) and m[0].uid < 1 << 21
                  and m[0].mtime >= 0 and m[0].devminor < 1 << 21]
        raw = tar_bytes(usable, fmt=fmt)
        blocks += [raw[i:i + 512] for i in range(0, len(raw), 512)]
    v7 = bytearray(tarfile.TarInfo("old/").tobuf(tarfile.USTAR_FORMAT))
    v7[156:157] = tarfile.AREGTYPE  # a V7 directory: a regular file named with a slash
    blocks.append(bytes(_rechecksum(v7)))
    return blocks


def _rechecksum(header: bytearray, signed: bool = False) -> bytearray:
    header[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in header)
    header[148:156] = b"%06o\0 " % total
    return header


def test_fast_header_parse_is_tarfiles():
    for block in _blocks():
        fast, slow = _both(block)
        assert fast == slow, block[:120]


def test_fast_header_parse_is_tarfiles_on_damage():
    """Damaged headers (checksum fixed or not, signed checksums, short and
    empty blocks): the same fields, or the same kind of error."""
    rng = random.Random(5)
    headers = [b for b in _blocks() if _both(b)[1] not in ("InvalidHeaderError",
                                                            "EOFHeaderError")]
    kinds = set()
    for _ in range(3000):
        block = bytearray(rng.choice(headers))
        for _ in range(rng.randrange(1, 4)):
            block[rng.randrange(512)] = rng.choice((0, 0x20, 0x30, 0x37, 0x80, 0xFF,
                                                    rng.randrange(256)))
        if rng.random() < 0.6:
            _rechecksum(block, signed=rng.random() < 0.3)
        fast, slow = _both(bytes(block))
        assert fast == slow, bytes(block)
        kinds.add(fast if isinstance(fast, str) else "parsed")
    for block in (b"", bytes(100), bytes(512)):
        assert _both(block)[0] == _both(block)[1]
    assert {"parsed", "InvalidHeaderError"} <= kinds


# --- what a tar input holds per entry -----------------------------------------------

def test_tree_holds_about_100_bytes_a_node():
    """50,000 files in 50 directories, as a tar lists them: what the tree
    keeps (Python's allocations, traced) is under 130 bytes a node (a Node,
    a dict slot, a name and a packed entry each were ~216)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tree = Tree()
        for d in range(50):
            tree.add(Entry(b"d%02d" % d, stat.S_IFDIR | 0o755, mtime_ns=T0))
            for i in range(1000):
                tree.add(Entry(b"d%02d/f%04d" % (d, i), stat.S_IFREG | 0o644, size=i,
                               mtime_ns=T0, origin="an archive: a member"))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tree) == 50 * 1001 + 1
    assert held / len(tree) < 130, held / len(tree)
    assert tree.entry(tree.lookup(b"d07/f0123")).size == 123


def test_tar_of_many_entries_packs_like_the_directory(tmp_path):
    """5,000 files in 5 directories: the tar's image is the directory's."""
    src = tmp_path / "src"
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(1000):
            (src / f"d{d}" / f"f{i:03}").write_bytes(b"%d" % i if i % 100 == 0 else b"")
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(src, arcname=".")
    pack(src, tmp_path / "dir.img")
    pack(archive, tmp_path / "tar.img")
    with Image.open(tmp_path / "dir.img") as a, Image.open(tmp_path / "tar.img") as b:
        assert _image_walk(a) == _image_walk(b)
        assert len(a.ns) == 5 * 1001 + 1


def _image_walk(img: Image) -> list[tuple]:
    return [(p, n.ino, n.mode, n.mtime_ns // 10**9, n.file_id,  # a tar keeps seconds
             img.read_range(n, 0, n.size) if n.is_reg else b"") for p, n in img.ns.walk()]


# --- the benches' tar stream and tar pack ------------------------------------------

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_tar_stream_is_the_small_tree(tmp_path):
    """bench/tarstream.py writes the tree `incfs.testing.smalltree` makes:
    packed, the stream and the tree give the same names, modes and data."""
    sys.path.insert(0, str(BENCH))
    try:
        import tarstream
    finally:
        sys.path.remove(str(BENCH))
    make_tree(str(tmp_path / "tree"), 3)
    with open(tmp_path / "stream.tar", "wb") as f:
        length = tarstream.write_tree(f, 3)
    assert length == (tmp_path / "stream.tar").stat().st_size and length % 10240 == 0
    pack(tmp_path / "tree", tmp_path / "tree.img")
    pack(tmp_path / "stream.tar", tmp_path / "stream.img")
    with Image.open(tmp_path / "tree.img") as a, Image.open(tmp_path / "stream.img") as b:
        walked = [[(p, n.mode, n.file_id, a_or_b.read_range(n, 0, n.size) if n.is_reg else b"")
                   for p, n in a_or_b.ns.walk()] for a_or_b in (a, b)]
    assert walked[0] == walked[1] and len(walked[0]) == 3 * 1001 + 1


@pytest.mark.skipif(not all(shutil.which(t) for t in ("mksquashfs", "tar", "zstd")),
                    reason="needs mksquashfs, tar and zstd")
def test_bench_tar_pack_runs(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(BENCH / "tar_pack.py"), "--files", "2000",
                           "--rounds", "1", "--scratch", str(tmp_path / "s"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"mksquashfs", "incfs dir", "incfs tar", "incfs tar.zst", "incfs stdin"}
    assert all(r[0]["seconds"] > 0 and r[0]["peak_rss_kib"] > 0 for r in runs.values())
    assert "time / mksquashfs" in proc.stdout and not (tmp_path / "s").exists()
