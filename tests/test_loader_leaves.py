"""The loader builds leaf hash blocks from the data it fetches whole (one
job takes every data block under a leaf) rather than fetching them: 32 bytes
per 4 KiB block off the wire and, for a file's data, a request to another
part of the source. What it builds is checked against its parent (fills.py);
a leaf that fails is fetched, and only the blocks that fail against it are
fetched again."""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

from conftest import RawImage, block_location
from incfs import BLOCK_SIZE, ROOT_INO
from incfs.format.records import TreeKind
from incfs.image import Image
from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.testing.nginx import Nginx

from test_loader_util import (MiB, assert_cache_clean, make_tree, mounted, status, wait_complete,
                              wait_for)

FILES = {
    "big.bin": random.Random(1).randbytes(6 * MiB),  # 1536 blocks: 12 leaves
    "odd.bin": random.Random(2).randbytes(700 * 1024 + 5),  # 2 leaves, the last one short
    "one-leaf.bin": random.Random(3).randbytes(40 * 1024),  # its leaf is its tree's top
    "tiny": b"tiny\n",  # one block: no hash blocks at all
}


@pytest.fixture
def served(tmp_path):
    make_tree(tmp_path / "src", FILES)
    (tmp_path / "www").mkdir()
    (tmp_path / "mnt").mkdir()
    image = tmp_path / "www" / "app.img"
    pack(tmp_path / "src", image, compress="none", index=False)
    with Nginx(tmp_path / "www") as nginx:
        yield image, nginx


def _config(tmp_path, nginx, **kw) -> MountConfig:
    return MountConfig(source=nginx.url("app.img"), mountpoint=str(tmp_path / "mnt"),
                       cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                       read_timeout=60, **kw)


def _leaves(image) -> tuple[int, int]:
    """(leaf hash blocks, bytes of the hash blocks above them) in the image."""
    leaves = upper = 0
    with Image.open(image) as img:
        for _path, node in img.ns.walk():
            if node.data is not None and node.has_tree and node.geometry.levels:
                count = node.geometry.level_counts[0]
                leaves += count
                upper += (node.geometry.hash_blocks - count) * BLOCK_SIZE
    return leaves, upper


def test_sequential_prefetch_fetches_no_leaf(tmp_path, served):
    image, nginx = served
    leaves, upper = _leaves(image)
    data = sum(len(v) for v in FILES.values())
    with mounted(_config(tmp_path, nginx, prefetch="sequential")) as mnt:
        loader = wait_complete(mnt)["loader"]
        assert (loader["leaves_built"], loader["leaves_fetched"]) == (leaves, 0)
        # the blocks' bytes and the hash blocks above the leaves, no more:
        # each block takes whole 4 KiB in the source, so data is rounded up
        blocks = sum(-(-len(v) // BLOCK_SIZE) for v in FILES.values())
        assert data <= loader["bytes_transferred"] <= blocks * BLOCK_SIZE + upper
        for name, want in FILES.items():
            assert (mnt / name).read_bytes() == want
    assert_cache_clean(tmp_path / "cache.img", complete=True)


def _read_in_order(path, piece: int) -> bytes:
    """The file read `piece` bytes at a time, one read after another, with
    the kernel's readahead off: every read reaches the loader by itself,
    in order, and the next one is sent only when the last one is served."""
    got = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        while chunk := os.pread(fd, piece, len(got)):
            got += chunk
    finally:
        os.close(fd)
    return bytes(got)


def test_a_sequential_reader_readahead_builds_the_leaves(tmp_path, served):
    """The 6 MiB file read in order, prefetch off: once the run is
    `readahead_after` (1 MiB, 2 of the 12 leaf groups) long, readahead
    windows go ahead of the reader. Each window after the first starts where
    the last one ended and ends on a leaf group, and the reader waits behind
    them, so their jobs take whole groups and build their leaves: all but
    the groups read by misses and the one the first window starts inside.
    (With the kernel's own readahead on, its reads arrive several at once as
    misses inside the windows, so how many are built depends on timing.)"""
    _image, nginx = served
    with mounted(_config(tmp_path, nginx, prefetch="none")) as mnt:
        assert _read_in_order(mnt / "big.bin", 128 * 1024) == FILES["big.bin"]
        loader = status(mnt)["loader"]
        assert loader["readahead_jobs"] > 0
        assert loader["leaves_built"] == 12 - 2 - 1, loader
        assert loader["leaves_fetched"] == 0
    assert_cache_clean(tmp_path / "cache.img")


def test_a_forged_block_costs_its_leaf_and_itself_only(tmp_path, served):
    """Block 7's bytes changed and its CRC forged to match: the leaf built
    from its group fails its check, so the loader fetches the leaf, stores
    the group's 127 good blocks and fails block 7 alone (EIO), storing
    nothing unverified."""
    image, nginx = served
    ino, offset, size, _crc = block_location(image, b"/big.bin", TreeKind.DATA, 7)
    raw = RawImage(image)
    raw.forge_block(offset, size, ino, TreeKind.DATA, 7)
    raw.save()
    with mounted(_config(tmp_path, nginx, prefetch="sequential")) as mnt:
        def all_but_one():
            s = status(mnt)
            return s["blocks_present"] and s["loader"]["blocks_failed"] and s

        wait_for(all_but_one, 60, what="prefetch to fail block 7")
        big = FILES["big.bin"]
        with open(mnt / "big.bin", "rb") as f:
            assert os.pread(f.fileno(), 7 * BLOCK_SIZE, 0) == big[:7 * BLOCK_SIZE]
            assert os.pread(f.fileno(), MiB, 8 * BLOCK_SIZE) == big[8 * BLOCK_SIZE:][:MiB]
            with pytest.raises(OSError) as e:
                os.pread(f.fileno(), BLOCK_SIZE, 7 * BLOCK_SIZE)
            assert e.value.errno == errno.EIO
        loader = status(mnt)["loader"]
        assert loader["leaves_fetched"] >= 1 and loader["leaves_built"] >= 1
        assert loader["crc_failures"] == 0  # the forged CRC held: only the tree caught it
    report = assert_cache_clean(tmp_path / "cache.img", complete=False)
    with Image.open(tmp_path / "cache.img") as cache:
        node = cache.ns.lookup(ROOT_INO, b"big.bin")
        assert not node.data.is_present(7) and node.data.is_present(6)
    assert report.integrity_failures == 0
