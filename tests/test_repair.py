"""A cache block whose bytes went bad on disk (a power cut keeps a block's
map record but loses its data) is fetched again instead of failing forever,
and the repair survives a remount. A plain image has no source to fetch
from, so the same damage there stays an EIO (tested in test_mount_extra)."""

from __future__ import annotations

import json
import os

from incfs.image import Image
from incfs.mount import MountConfig, mount_background, umount
from incfs.pack import pack
from incfs.serve import RangeServer


def _status(mnt) -> dict:
    return json.loads((mnt / ".incfs" / "status").read_text())


def _complete_cache(url: str, mnt, cache) -> None:
    mount_background(MountConfig(source=url, mountpoint=str(mnt), cache=str(cache),
                                 allow_unsigned=True, prefetch="sequential",
                                 # the bytes must stay in the image (a plain copy
                                 # would take them: tests/test_space*.py)
                                 passthrough=False))
    try:
        (mnt / "f.bin").read_bytes()
        for _ in range(400):
            if _status(mnt)["complete"]:
                break
            import time
            time.sleep(0.05)
        assert _status(mnt)["complete"]
    finally:
        umount(str(mnt))


def test_bad_cache_block_is_refetched_and_stays_repaired(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    content = os.urandom(64 * 4096)
    (src / "f.bin").write_bytes(content)
    image, cache, mnt = tmp_path / "a.img", tmp_path / "cache.img", tmp_path / "mnt"
    mnt.mkdir()
    pack(src, image, compress="none")
    with RangeServer(image) as server:
        _complete_cache(server.url, mnt, cache)
        with Image.open(cache) as img:
            node = img.ns.lookup(1, b"f.bin")
            offset, _info, _crc = node.data.get(10)
        with open(cache, "r+b") as f:  # the bytes of block 10 never reached the disk
            f.seek(offset)
            f.write(bytes(4096))
        mount_background(MountConfig(source=server.url, mountpoint=str(mnt), cache=str(cache),
                                     allow_unsigned=True, prefetch="none", passthrough=False))
        try:
            assert (mnt / "f.bin").read_bytes() == content
            status = _status(mnt)
            assert status["blocks_repaired"] >= 1 and status["bytes_fetched"] > 0
        finally:
            umount(str(mnt))
    # offline now: the repaired mapping is the one the image replays
    with Image.open(cache) as img:
        node = img.ns.lookup(1, b"f.bin")
        assert img.read_range(node, 0, node.size) == content
