"""Protocol 1.1 on a real mount: a loader sets owners, device numbers and
extended attributes of what it creates; every bad value gets a clear errno
and changes nothing; all of it survives a remount."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from mounting import mounts  # noqa: F401 - fixture

from incfs import ROOT_INO
from incfs.control.wire import MINOR, Op

pytestmark = [pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
              pytest.mark.skipif(os.geteuid() != 0, reason="owners are shown as stored to root")]

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep


def expect(code: int, fn, *args, **kwargs) -> None:
    with pytest.raises(OSError) as e:
        fn(*args, **kwargs)
    assert e.value.errno == code, (e.value, args, kwargs)


def test_owners_devices_and_xattrs_are_stored_and_served(mounts):
    m = mounts(keep_cache=True)
    with m.client() as c:
        assert c.server["minor"] == MINOR == 1
        d = c.mkdir(ROOT_INO, "etc", 0o750, uid=0, gid=42, xattrs={"user.dir": b"d"})
        c.create_file(d, "shadow", 10, 0o640, uid=0, gid=42)
        c.create_file(ROOT_INO, "ping", 10, 0o755, uid=1000, gid=1000,
                      xattrs={"security.capability": CAP, b"user.bin\xff": b"\x00\x01"})
        c.symlink(ROOT_INO, "link", "ping", uid=7, gid=8)
        c.mknod(ROOT_INO, "null", "chr", 0o666, os.makedev(1, 3))
        c.mknod(ROOT_INO, "sda", "blk", 0o660, os.makedev(8, 0), gid=6)
        c.mknod(ROOT_INO, "fifo", "fifo", 0o600, uid=5)
        c.mknod(ROOT_INO, "sock", "sock", 0o755)
    for _ in range(2):  # as created, then after a remount (replayed from the image)
        st = os.stat(m / "etc")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 42, 0o750)
        assert os.stat(m / "etc" / "shadow").st_gid == 42
        st = os.stat(m / "ping")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert os.getxattr(m / "ping", "security.capability") == CAP
        assert os.getxattr(m / "ping", b"user.bin\xff") == b"\x00\x01"
        assert sorted(os.listxattr(m / "ping")) == ["security.capability", "user.bin\udcff"]
        assert os.getxattr(m / "etc", "user.dir") == b"d"
        assert (os.lstat(m / "link").st_uid, os.lstat(m / "link").st_gid) == (7, 8)
        null, sda = os.stat(m / "null"), os.stat(m / "sda")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
        assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode) and os.stat(m / "fifo").st_uid == 5
        assert stat.S_ISSOCK(os.stat(m / "sock").st_mode)
        m.restart()


def test_bad_posix_fields_are_refused(mounts):
    m = mounts()
    with m.client() as c:
        before = c.status()["inodes"]
        for code, kwargs in [
                (errno.EINVAL, {"uid": -1}), (errno.EINVAL, {"gid": 1 << 32}),
                (errno.EINVAL, {"xattrs": {"nonamespace": b"x"}}),
                (errno.EINVAL, {"xattrs": {"user.incfs.file_id": b"x"}}),  # reserved
                (errno.EINVAL, {"xattrs": {"system.other": b"x"}}),
                (errno.ERANGE, {"xattrs": {"user." + "n" * 251: b"x"}}),
                (errno.E2BIG, {"xattrs": {"user.big": bytes(65537)}}),
                (errno.E2BIG, {"xattrs": {f"user.{i}": bytes(60000) for i in range(20)}})]:
            expect(code, c.create_file, ROOT_INO, "f", 1, **kwargs)
            expect(code, c.mkdir, ROOT_INO, "d", **kwargs)
        expect(errno.EINVAL, c.mknod, ROOT_INO, "n", "dir")
        expect(errno.EINVAL, c.mknod, ROOT_INO, "n", "fifo", rdev=5)  # only devices have one
        expect(errno.EINVAL, c.mknod, ROOT_INO, "n", "chr", rdev=1 << 64)
        assert c.status()["inodes"] == before  # nothing was created
        c.mknod(ROOT_INO, "n", "fifo")
        expect(errno.EEXIST, c.mknod, ROOT_INO, "n", "sock")
        expect(errno.EINVAL, c.mknod, ROOT_INO, "", "sock")
        # wrong JSON types are protocol errors: EPROTO, and the connection closes
        expect(errno.EPROTO, c._call, Op.CREATE_FILE, {"parent": 1, "name": "x", "size": 1,
                                                       "uid": "0"})
    with m.client() as c:
        expect(errno.EPROTO, c._call, Op.MKDIR, {"parent": 1, "name": "x", "xattrs": ["a"]})
    with m.client() as c:
        expect(errno.EPROTO, c._call, Op.MKDIR, {"parent": 1, "name": "x",
                                                 "xattrs": {"user.a": 1}})
    with m.client() as c:
        expect(errno.EINVAL, c._call, Op.MKDIR, {"parent": 1, "name": "x",
                                                 "xattrs": {"user.a": "not hex"}})
        expect(errno.EINVAL, c._call, Op.MKNOD, {"parent": 1, "name": "x", "type": "chr",
                                                 "major": -1})
        assert c._call(Op.MKNOD, {"parent": 1, "name": "tty", "type": "chr", "major": 5,
                                  "minor": 0})["ino"]
    assert os.stat(m / "tty").st_rdev == os.makedev(5, 0)


def test_a_new_client_refuses_what_an_old_daemon_would_ignore(mounts):
    m = mounts()
    with m.client() as c:
        c.minor = 0  # as HELLO from a 1.0 daemon (no `minor`) leaves it
        expect(errno.EOPNOTSUPP, c.create_file, ROOT_INO, "f", 1, uid=5)
        expect(errno.EOPNOTSUPP, c.mknod, ROOT_INO, "n", "fifo")
        expect(errno.EOPNOTSUPP, c.set_read_timeouts, {1: 1.0})
        assert c.create_file(ROOT_INO, "f", 1)  # 1.0 requests still go
        assert c.mkdir(ROOT_INO, "d", uid=0, gid=0)  # defaults are sent as 1.0
