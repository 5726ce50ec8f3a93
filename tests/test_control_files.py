"""incfs v2's control files on a real mount: `.incfs/index/<file-id>`,
`.incfs/incomplete/<file-id>` (watched with real inotify), the last read
error, per-uid read timeouts and the blocks_written counter."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from inotify import IN_DELETE, IN_DELETE_SELF, IN_DONT_FOLLOW, IN_IGNORED, Watcher
from mounting import errno_of, fork_child, mounts, wait_child, wait_until  # noqa: F401 - fixture
from prometheus_client.parser import text_string_to_metric_families

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.metrics import render

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

NOBODY = 65534
CONTENT = bytes(range(256)) * (8 * BLOCK_SIZE // 256)  # 8 blocks


def file_id(path) -> str:
    return os.getxattr(path, "user.incfs.file_id").decode()


def blocks(indexes) -> list[tuple[int, bytes]]:
    return [(i, CONTENT[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in indexes]


def test_index_is_the_file_itself(mounts):
    m = mounts()
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=len(CONTENT))
        c.fill_blocks(ino, blocks(range(8)))
        other = c.create_file(ROOT_INO, "g.bin", size=10)
    fid = file_id(m / "f.bin")
    by_id = m / ".incfs" / "index" / fid
    assert os.stat(by_id).st_ino == os.stat(m / "f.bin").st_ino == ino
    assert by_id.read_bytes() == CONTENT
    assert (m / ".incfs" / "index" / fid.upper()).read_bytes() == CONTENT
    assert os.stat(m / ".incfs" / "index" / file_id(m / "g.bin")).st_ino == other
    for bad in ("not-hex", "zz" * 16, fid[:-2], fid + "00", "00" * 16):
        assert errno_of(os.stat, m / ".incfs" / "index" / bad) == errno.ENOENT, bad
    assert os.listdir(m / ".incfs" / "index") == []  # looked up, never listed
    assert sorted(os.listdir(m / ".incfs")) == ["control", "incomplete", "index", "pending",
                                                 "status"]
    assert ".incfs" not in os.listdir(m.path)


def test_a_read_by_id_waits_like_one_by_path(mounts):
    m = mounts()
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=len(CONTENT))
        path = m / ".incfs" / "index" / file_id(m / "f.bin")

        def read_block_3() -> None:
            fd = os.open(path, os.O_RDONLY)
            assert os.pread(fd, BLOCK_SIZE, 3 * BLOCK_SIZE) == blocks([3])[0][1]

        reader = fork_child(read_block_3)
        wait_until(lambda: any(r.ino == ino for r in c.pending_reads()), what="a pending read")
        c.fill_blocks(ino, blocks(range(8)))
        assert wait_child(reader, timeout=60) == 0


def test_incomplete_entries_vanish_when_their_file_completes(mounts):
    m = mounts()
    inc = m / ".incfs" / "incomplete"
    with m.client() as c:
        a = c.create_file(ROOT_INO, "a", size=2 * BLOCK_SIZE)
        b = c.create_file(ROOT_INO, "b", size=BLOCK_SIZE)
        c.create_file(ROOT_INO, "empty", size=0)  # complete from the start
        c.mkdir(ROOT_INO, "dir")
        ida, idb = file_id(m / "a"), file_id(m / "b")
        assert sorted(os.listdir(inc)) == sorted([ida, idb])
        assert os.readlink(inc / ida) == f"../index/{ida}"
        assert os.stat(inc / ida).st_ino == a  # the link leads to the file
        with Watcher() as w:
            dir_wd = w.watch(inc, IN_DELETE | IN_DELETE_SELF)
            wd = w.watch(inc / ida, IN_DELETE_SELF | IN_DONT_FOLLOW)
            c.fill_blocks(a, blocks([0]))
            assert os.listdir(inc).count(ida) == 1  # half a file is still incomplete
            c.fill_blocks(a, blocks([1]))
            events = w.events(timeout=30)
        masks = {mask for got_wd, mask, _ in events if got_wd == wd}
        assert IN_DELETE_SELF in masks and IN_IGNORED in masks, events
        # FUSE cannot make the kernel report IN_DELETE on the directory
        assert all(got_wd != dir_wd for got_wd, _, _ in events), events
        assert os.listdir(inc) == [idb]
        assert errno_of(os.lstat, inc / ida) == errno.ENOENT
        assert os.stat(m / "a").st_nlink == 1  # the file itself is untouched
        later = c.create_file(ROOT_INO, "later", size=1)
        assert sorted(os.listdir(inc)) == sorted([idb, file_id(m / "later")])
        c.fill_blocks(b, blocks([0]))
        c.fill_blocks(later, [(0, b"x")])
    assert os.listdir(inc) == []
    assert errno_of(os.lstat, inc / "zz") == errno.ENOENT


def _read_as(path: str, uid: int, index: int) -> int:
    """pread one block as `uid` (opened as root first, so the path's
    directories need not be reachable); returns the errno (0: read)."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead of other blocks
    os.setresuid(uid, uid, uid)
    try:
        os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
    except OSError as e:
        return e.errno
    return 0


def _exit_with(fn, *args) -> None:
    os._exit(fn(*args))


def _child_code(pid: int) -> int:
    return wait_child(pid, timeout=120)


def test_per_uid_read_timeouts_and_the_last_read_error(mounts):
    m = mounts(read_timeout=0.5)
    path = os.fspath(m / "f.bin")
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=len(CONTENT))
        assert c.last_read_error() is None
        assert c.set_read_timeouts({NOBODY: 60.0, 4242: None}) == {NOBODY: 60.0, 4242: None}
        assert c.read_timeouts() == {NOBODY: 60.0, 4242: None}
        patient = fork_child(_exit_with, _read_as, path, NOBODY, 6)
        wait_until(lambda: any(r.block == 6 for r in c.pending_reads()), timeout=60,
                   what="nobody's read to wait")
        hasty = fork_child(_exit_with, _read_as, path, 0, 5)  # root: the mount's 0.5 s
        assert _child_code(hasty) == errno.ETIME
        error = c.last_read_error()
        assert error["ino"] == ino and error["block"] == 5 and error["uid"] == 0
        assert error["errno"] == errno.ETIME and error["error"] == "ETIME"
        assert error["file_id"] == file_id(path) and error["time_ns"] > 0
        c.fill_blocks(ino, blocks([6]))
        assert _child_code(patient) == 0  # its own bound: still waiting at 0.5 s
        status = c.status()
    assert status["last_read_error"] == error
    assert status["read_timeouts"] == {str(NOBODY): 60.0, "4242": None}
    assert status["read_timeout"] == 0.5
    assert m.status()["last_read_error"] == error  # .incfs/status
    text = subprocess.run([sys.executable, "-m", "incfs.cli", "status", os.fspath(m)],
                          capture_output=True, text=True, check=True).stdout
    assert "last error" in text and "ETIME" in text and "block 5" in text


def test_read_timeout_requests_are_checked(mounts):
    m = mounts()
    with m.client() as c:
        for bad in ([{"uid": -1, "timeout": 1}], [{"uid": 1 << 32, "timeout": 1}],
                    [{"uid": 1, "timeout": 0}], [{"uid": 1, "timeout": -3}],
                    [{"uid": 1, "timeout": 1e12}], [{"uid": 1}]):
            c.set_read_timeouts({})
            with pytest.raises(OSError) as e:
                c._call(16, {"timeouts": bad})
            assert e.value.errno == errno.EINVAL, bad
        assert c.read_timeouts() == {}  # nothing of a refused table was applied
        c.set_read_timeouts({7: 2.5})
        with pytest.raises(OSError) as e:  # a wrong JSON type: EPROTO, connection closed
            c._call(16, {"timeouts": [{"uid": "7", "timeout": 1}]})
        assert e.value.errno == errno.EPROTO
    with m.client() as c:
        assert c.read_timeouts() == {7: 2.5}


def test_blocks_written_counts_stored_blocks(mounts):
    m = mounts()
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=len(CONTENT))
        assert c.fill_blocks(ino, blocks(range(3))) == 3
        assert c.fill_blocks(ino, blocks(range(5))) == 2  # three were there already
        status = c.status()
    assert status["blocks_written"] == 5 == m.status()["blocks_written"]
    values = {s.name: s.value for f in text_string_to_metric_families(render(status))
              for s in f.samples}
    assert values["incfs_blocks_written_total"] == 5
    assert json.loads((m / ".incfs" / "status").read_text())["blocks_written"] == 5


def test_two_files_with_one_id_show_as_one(mounts):
    m = mounts()
    same = bytes(range(16))
    with m.client() as c:
        first = c.create_file(ROOT_INO, "first", size=10, file_id=same)
        c.create_file(ROOT_INO, "second", size=10, file_id=same)
        assert os.stat(m / ".incfs" / "index" / same.hex()).st_ino == first
        assert os.listdir(m / ".incfs" / "incomplete") == [same.hex()]
        c.fill_blocks(first, [(0, b"0123456789")])
        # the one a lookup finds is complete: the id is not listed, though
        # "second" is still loading (a loader should not reuse ids)
        assert os.listdir(m / ".incfs" / "incomplete") == []
