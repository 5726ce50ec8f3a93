"""Image.fill building leaf hash blocks from the data under them (fills.py):
a loader that fetches all 128 data blocks under a leaf need not fetch the
leaf; what the fill builds is checked against its parent like a fetched
block, so only the signed data gets a leaf stored."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from conftest import RawImage, block_location
from incfs import BLOCK_SIZE, ROOT_INO
from incfs.format.records import TreeKind
from incfs.image import FillBlock, Image
from incfs.pack import pack
from incfs.testing.caches import new_cache, stored_block

BLOCKS = 2 * 128 + 5  # two whole leaf groups and a short last one
SMALL = 10  # one leaf, the top of its tree: checked against the root hash


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fills")
    tree = root / "tree"
    tree.mkdir()
    rng = random.Random(5)
    (tree / "big").write_bytes(rng.randbytes(BLOCKS * BLOCK_SIZE - 100))
    (tree / "small").write_bytes(rng.randbytes(SMALL * BLOCK_SIZE))
    pack(tree, root / "app.img", compress="zstd", index=False)
    return root / "app.img"


def _blocks(src: Image, name: bytes, tree: TreeKind, indexes) -> list[FillBlock]:
    node = src.ns.lookup(ROOT_INO, name)
    bmap = node.data if tree == TreeKind.DATA else node.hashes
    return [stored_block(src, node, tree, i, *bmap.get(i)[:2]) for i in indexes]


def _hash_bytes(img: Image, name: bytes, index: int) -> bytes:
    return img.hash_block(img.ns.lookup(ROOT_INO, name), index)


def test_whole_groups_store_their_leaves_without_them(packed, tmp_path):
    with Image.open(packed) as src, new_cache(packed, tmp_path / "c.img") as cache:
        node = cache.ns.lookup(ROOT_INO, b"big")
        geo = node.geometry
        assert geo.levels == 2 and geo.hash_blocks == 4  # the top, then 3 leaves
        top = cache.fill(node.ino, _blocks(src, b"big", TreeKind.HASH, [0]))
        assert top.stored == 1
        for group, leaf in ((range(0, 128), 1), (range(256, BLOCKS), 3)):
            result = cache.fill(node.ino, _blocks(src, b"big", TreeKind.DATA, group),
                                leaves=[leaf])
            assert (result.errors, result.leaves_built) == ([], [leaf])
            assert result.stored == len(group) + 1
            assert _hash_bytes(cache, b"big", leaf) == _hash_bytes(src, b"big", leaf)
        small = cache.ns.lookup(ROOT_INO, b"small")
        result = cache.fill(small.ino, _blocks(src, b"small", TreeKind.DATA, range(SMALL)),
                            leaves=[0])
        assert (result.errors, result.leaves_built, result.stored) == ([], [0], SMALL + 1)
        assert cache.ns.lookup(ROOT_INO, b"small").complete
    with Image.open(tmp_path / "c.img") as again:  # stored, not only in memory
        node = again.ns.lookup(ROOT_INO, b"big")
        assert node.hashes.is_present(1) and node.hashes.is_present(3)
        with Image.open(packed) as src:
            want = src.read_range(src.ns.lookup(ROOT_INO, b"big"), 0, 128 * BLOCK_SIZE)
        assert again.read_range(node, 0, 128 * BLOCK_SIZE) == want


@pytest.mark.parametrize("leaves", [[], [2]], ids=["not asked", "other leaf"])
def test_a_leaf_is_built_only_when_asked_for(packed, tmp_path, leaves):
    with Image.open(packed) as src, new_cache(packed, tmp_path / "c.img") as cache:
        ino = cache.ns.lookup(ROOT_INO, b"big").ino
        cache.fill(ino, _blocks(src, b"big", TreeKind.HASH, [0]))
        result = cache.fill(ino, _blocks(src, b"big", TreeKind.DATA, range(128)), leaves=leaves)
        assert result.stored == 0 and result.leaves_built == []
        assert {code for _i, code, _why in result.errors} == {errno.ENODATA}


def test_a_group_short_of_one_block_builds_nothing(packed, tmp_path):
    with Image.open(packed) as src, new_cache(packed, tmp_path / "c.img") as cache:
        ino = cache.ns.lookup(ROOT_INO, b"big").ino
        cache.fill(ino, _blocks(src, b"big", TreeKind.HASH, [0]))
        result = cache.fill(ino, _blocks(src, b"big", TreeKind.DATA, range(127)), leaves=[1])
        assert (result.stored, result.leaves_built, result.leaves_refused) == (0, [], [])
        assert len(result.errors) == 127


def test_a_leaf_without_its_parent_is_not_built(packed, tmp_path):
    with Image.open(packed) as src, new_cache(packed, tmp_path / "c.img") as cache:
        ino = cache.ns.lookup(ROOT_INO, b"big").ino
        result = cache.fill(ino, _blocks(src, b"big", TreeKind.DATA, range(128)), leaves=[1])
        assert result.stored == 0 and result.leaves_refused == [1]
        assert not cache.ns.lookup(ROOT_INO, b"big").hashes.is_present(1)


def test_one_forged_block_fails_the_built_leaf_and_stores_nothing(packed, tmp_path):
    """A block whose CRC was forged to match: the leaf built from it does not
    match its parent, so neither it nor any data under it is stored; the
    fetched leaf then lets the good blocks in and names the bad one."""
    image = tmp_path / "forged.img"
    image.write_bytes(packed.read_bytes())
    ino, offset, size, _crc = block_location(image, b"/big", TreeKind.DATA, 7)
    raw = RawImage(image)
    raw.forge_block(offset, size, ino, TreeKind.DATA, 7)
    raw.save()
    with Image.open(image) as src, new_cache(image, tmp_path / "c.img") as cache:
        node = cache.ns.lookup(ROOT_INO, b"big")
        cache.fill(node.ino, _blocks(src, b"big", TreeKind.HASH, [0]))
        failures = cache.counters["verify_failures"]
        data = _blocks(src, b"big", TreeKind.DATA, range(128))
        result = cache.fill(node.ino, data, leaves=[1])
        assert (result.stored, result.leaves_built, result.leaves_refused) == (0, [], [1])
        assert {code for _i, code, _why in result.errors} == {errno.ENODATA}
        assert cache.counters["verify_failures"] == failures + 1
        assert node.data.present == 0 and not node.hashes.is_present(1)
        assert cache.fill(node.ino, _blocks(src, b"big", TreeKind.HASH, [1])).stored == 1
        again = cache.fill(node.ino, data)
        assert again.stored == 127
        assert [(i, code) for i, code, _why in again.errors] == [(7, errno.EBADMSG)]
