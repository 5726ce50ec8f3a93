"""Native hand-off (R11): a complete mount is replaced by a kernel EROFS mount
of the same tree, mounted from a file with no loop device."""

from __future__ import annotations

import filecmp
import os

import pytest

from incfs.mount import MountConfig, mount_background, umount
from incfs.native import handoff, kernel_has_erofs
from incfs.pack import pack

pytestmark = pytest.mark.skipif(not kernel_has_erofs(),
                                reason="kernel lacks EROFS (CONFIG_EROFS_FS)")


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "sub" / "b.txt").write_text("hello\n" * 1000)
    (root / "empty").write_bytes(b"")
    os.symlink("sub/b.txt", root / "link")
    return root


def _same_tree(a, b) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    return all(_same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


def test_handoff_serves_same_tree_from_kernel(tmp_path):
    src = _tree(tmp_path / "src")
    image, mnt = tmp_path / "a.img", tmp_path / "mnt"
    mnt.mkdir()
    pack(src, image, compress="lz4")
    mount_background(MountConfig(source=str(image), mountpoint=str(mnt), allow_unsigned=True))
    held = open(mnt / "sub" / "b.txt", "rb")
    try:
        erofs = handoff(str(mnt), tmp_path / "a.erofs")
        line = next(line for line in open("/proc/self/mounts") if f" {mnt} " in line)
        source, _mp, fstype = line.split()[:3]
        assert fstype == "erofs"
        assert source == str(erofs) and not source.startswith("/dev/loop")
        assert _same_tree(src, mnt)
        assert (mnt / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        assert os.readlink(mnt / "link") == "sub/b.txt"
        # a program that had the file open before the hand-off keeps reading it
        assert held.read() == (src / "sub" / "b.txt").read_bytes()
    finally:
        held.close()
        if os.path.ismount(mnt):
            umount(str(mnt))
    assert not os.path.ismount(mnt)


def test_handoff_refuses_incomplete_mount(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_background(MountConfig(source="empty", mountpoint=str(mnt), cache=str(tmp_path / "c.img")))
    try:
        from incfs import ROOT_INO
        from incfs.control import Client
        from incfs.errors import UsageError

        with Client.connect(mnt) as client:
            client.create_file(ROOT_INO, "never-filled", size=8192)
        with pytest.raises(UsageError, match="not complete"):
            handoff(str(mnt), tmp_path / "x.erofs")
        assert not (tmp_path / "x.erofs").exists()
    finally:
        umount(str(mnt))
