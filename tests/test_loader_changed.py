"""A source that changes under a mount (issue 10, item 4), and blocks the
loader must refuse: real nginx, real mounts, real images.

When the object behind the URL becomes another image (ETag, size or
superblock changed), the loader must stop fetching, go offline with status
"source changed" saying how to update (remount), keep serving the blocks
present, and fail reads of absent blocks at once (EIO) instead of fetching
blocks that can never verify. Bytes of blocks the service refused must not
count as fetched."""

from __future__ import annotations

import errno
import os
import random
import zlib
from pathlib import Path

import pytest

from incfs import BLOCK_SIZE
from incfs.image import Image
from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.testing.nginx import Nginx

from test_loader_util import MiB, assert_cache_clean, make_tree, mounted, status, wait_for


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with Nginx(root) as nginx:
        yield root, nginx


def _tree(root: Path, seed: int) -> Path:
    rng = random.Random(seed)
    return make_tree(root, {"a.bin": rng.randbytes(2 * MiB), "b.bin": rng.randbytes(2 * MiB)})


def _config(tmp_path, url: str, **kw) -> MountConfig:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    return MountConfig(source=url, mountpoint=str(mnt), cache=str(tmp_path / "cache.img"),
                       allow_unsigned=True, read_timeout=60, prefetch="none", **kw)


def _replace_image(root: Path, tmp_path: Path, seed: int) -> None:
    """Pack another tree and put it where the served image was (atomically,
    as a deploy would)."""
    src = _tree(tmp_path / f"src{seed}", seed)
    pack(src, tmp_path / "next.img", compress="none")
    os.replace(tmp_path / "next.img", root / "app.img")


def _read_error(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno
    return None


@pytest.mark.parametrize("validators", [True, False], ids=["etag", "superblock"])
def test_changed_source_goes_offline_and_keeps_serving(tmp_path, served, validators):
    """With validators the ETag/size change is seen on the next request;
    without them (a server whose ETags cannot be trusted) blocks fail their
    checks and the superblock tells that the image is another one."""
    root, _nginx = served
    original = _tree(tmp_path / "src", seed=1)
    pack(original, root / "app.img", compress="none")
    options = None if validators else {"check_validators": False}
    with mounted(_config(tmp_path, _nginx.url("app.img"), source_options=options)) as mnt:
        a = (mnt / "a.bin").read_bytes()
        assert a == (original / "a.bin").read_bytes()
        _replace_image(root, tmp_path, seed=2)
        assert _read_error(mnt / "b.bin") == errno.EIO
        loader = wait_for(lambda: status(mnt)["loader"]["source_changed"]
                          and status(mnt)["loader"], 30, what="source changed")
        assert loader["state"] == "offline"
        assert "source changed" in loader["offline"] and "remount" in loader["offline"]
        fetched = status(mnt)["bytes_fetched"]
        # what is present is still served; what is absent fails at once
        assert (mnt / "a.bin").read_bytes() == a
        assert _read_error(mnt / "b.bin") == errno.EIO
        requests = status(mnt)["loader"]["requests"]
        assert _read_error(mnt / "b.bin") == errno.EIO
        after = status(mnt)
        assert after["loader"]["requests"] == requests  # fetching stopped
        assert after["bytes_fetched"] == fetched
    assert_cache_clean(tmp_path / "cache.img")


def test_a_change_before_the_first_read_is_told_by_the_early_answers_etag(tmp_path, served):
    """A new cache is made from the answer read before the HTTP client loads
    (incfs.loader.early); the loader's source, opened after READY, takes
    that answer's ETag as first seen. Another image put in place before any
    read is then "source changed" at the first answer, before a block of it
    is stored or refused. (What is stored is what came with the first
    image's metadata, in the same answer: incfs.loader.tail.)"""
    root, nginx = served
    pack(_tree(tmp_path / "src", seed=1), root / "app.img", compress="none")
    with mounted(_config(tmp_path, nginx.url("app.img"))) as mnt:
        loader = wait_for(lambda: status(mnt)["loader"]["sources"]
                          and status(mnt)["loader"]["first_answer"] == "stored"
                          and status(mnt)["loader"], 30, what="the loader's source")
        assert loader["requests"] == 0 and loader["sources"][0]["requests"] == 0
        first_answer = loader["first_answer_blocks"], status(mnt)["bytes_fetched"]
        _replace_image(root, tmp_path, seed=2)
        later = (root / "app.img").stat().st_mtime + 100  # nginx's ETag is mtime-size
        os.utime(root / "app.img", (later, later))
        assert _read_error(mnt / "b.bin") == errno.EIO
        loader = wait_for(lambda: status(mnt)["loader"]["source_changed"]
                          and status(mnt)["loader"], 30, what="source changed")
        assert "ETag changed" in loader["offline"]
        assert loader["bytes_refused"] == 0 and loader["crc_failures"] == 0
        assert (loader["blocks_fetched"], status(mnt)["bytes_fetched"]) == first_answer
    assert_cache_clean(tmp_path / "cache.img")


def test_remount_after_change_updates(tmp_path, served):
    """The way out the status names: a remount switches to the new image."""
    root, nginx = served
    pack(_tree(tmp_path / "src", seed=1), root / "app.img", compress="none")
    config = _config(tmp_path, nginx.url("app.img"))
    with mounted(config) as mnt:
        (mnt / "a.bin").read_bytes()
        _replace_image(root, tmp_path, seed=2)
        _read_error(mnt / "b.bin")
    with mounted(config) as mnt:
        assert (mnt / "b.bin").read_bytes() == (tmp_path / "src2" / "b.bin").read_bytes()
        assert status(mnt)["loader"]["source_changed"] is False


# --- refused blocks --------------------------------------------------------------

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0xEDB88320 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)
_CRC_TOP = {t >> 24: i for i, t in enumerate(_CRC_TABLE)}


def forge_crc(data: bytes, target: int) -> bytes:
    """`data` with its last 4 bytes changed so that its CRC32 is `target`:
    bytes that pass the loader's CRC check yet fail the Merkle tree, as a
    hostile server could send (running CRC32 backwards over 4 bytes)."""
    prefix = data[:-4]
    reg = target ^ 0xFFFFFFFF
    for _ in range(4):
        i = _CRC_TOP[reg >> 24]
        reg = ((reg ^ _CRC_TABLE[i]) << 8 | i) & 0xFFFFFFFF
    start = zlib.crc32(prefix) ^ 0xFFFFFFFF
    return prefix + (reg ^ start).to_bytes(4, "little")


def test_refused_blocks_do_not_count_as_fetched(tmp_path, served):
    root, nginx = served
    pack(_tree(tmp_path / "src", seed=1), root / "app.img", compress="none")
    with Image.open(root / "app.img") as img:
        ino = img.ns.lookup(1, b"a.bin").ino
        offset, _info, crc = img.ns.inodes[ino].data.get(10)
    size = BLOCK_SIZE  # raw block (compress="none")
    with open(root / "app.img", "r+b") as f:
        f.seek(offset)
        good = f.read(size)
        bad = bytes(b ^ 0x55 for b in good)
        if crc is not None:  # a FULL map: make the bytes pass their CRC, fail the tree
            bad = forge_crc(bad, crc)
            assert zlib.crc32(bad) == crc
        assert bad != good
        f.seek(offset)
        f.write(bad)
    with mounted(_config(tmp_path, nginx.url("app.img"))) as mnt:
        fd = os.open(mnt / "a.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            with pytest.raises(OSError) as caught:
                os.pread(fd, BLOCK_SIZE, 10 * BLOCK_SIZE)
            assert caught.value.errno == errno.EIO
            # a neighbour fetched with it was stored and reads fine
            assert os.pread(fd, BLOCK_SIZE, 11 * BLOCK_SIZE) == \
                (tmp_path / "src" / "a.bin").read_bytes()[11 * BLOCK_SIZE:12 * BLOCK_SIZE]
        finally:
            os.close(fd)
        s = status(mnt)
        loader = s["loader"]
        assert loader["bytes_refused"] >= size  # refused (at least) once
        assert s["bytes_fetched"] + loader["bytes_refused"] == loader["bytes_transferred"]
        assert loader["source_changed"] is False  # a bad block is not another image
    assert_cache_clean(tmp_path / "cache.img")
