"""The FUSE session layer on real mounts: kernel caching, the read path
while loading, INTERRUPT, passthrough for complete files, request counts."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.passthrough import plain_directory, possible
from conftest import source_entries, xattrs_of
from mounting import empty_mount, fork_child, mounted, mounts, wait_child, wait_until  # noqa: F401

MiB = 1 << 20


_clients: dict[int, object] = {}


def fuse_status(m) -> dict:
    """Through one control connection per mount: reading .incfs/status, or
    connecting (which reads .incfs/control), would itself be FUSE requests."""
    key = id(m)
    if key not in _clients or getattr(_clients[key], "_mount", None) is not m.pid:
        c = m.client()
        c._mount = m.pid
        _clients[key] = c
    return _clients[key].status()["fuse"]


def requests(m) -> dict:
    return fuse_status(m)["requests"]


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path, incfs):
    src = tmp_path / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    data = os.urandom(8 * MiB + 123)
    (src / "big.bin").write_bytes(data)
    for i in range(50):
        (src / "dir" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "dir" / "sub" / "deep.txt").write_text("deep\n")
    os.symlink("dir/f1.txt", src / "link")
    img = tmp_path / "app.img"
    incfs("pack", str(src), str(img))
    return img, src, data


def test_second_pass_of_a_tree_walk_never_reaches_the_daemon(tmp_path, image):
    img, src, _ = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m, m.client() as c:
        def requests(_m):  # one client: connecting looks .incfs/control up
            return c.status()["fuse"]["requests"]

        walk = ["ls", "-laR", str(m.path)]
        done = subprocess.run(walk, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        first = done.stdout
        (m.path / "link").read_text()
        before = requests(m)
        second = subprocess.run(walk, capture_output=True, text=True, check=True).stdout
        (m.path / "link").read_text()
        after = requests(m)
        assert first == second
        # (ls -l also asks for security.* and ACL xattrs, which the kernel never caches)
        for op in ("LOOKUP", "GETATTR", "READDIR", "READDIRPLUS", "READLINK", "OPENDIR"):
            assert after.get(op, 0) == before.get(op, 0), op
        assert "dir" in first and "deep.txt" in first


def test_a_present_block_beside_absent_ones_is_served_without_waiting(empty_mount):
    """The kernel asks for its whole readahead window; only block 0 is here.
    With reads that wait forever, waiting for the window would hang."""
    m = empty_mount
    m.restart(read_timeout=None)
    block0 = os.urandom(BLOCK_SIZE)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "sparse.bin", size=4 * MiB)
        c.fill_blocks(ino, [(0, block0)])

    def reader():
        with open(m / "sparse.bin", "rb") as f:
            assert f.read(BLOCK_SIZE) == block0

    assert wait_child(fork_child(reader), timeout=60) == 0
    assert m.status()["pending_reads"] == 0  # nobody waits for the window's tail


def test_a_block_that_is_needed_still_waits_and_then_arrives(empty_mount):
    m = empty_mount
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(4)]
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "f.bin", size=4 * BLOCK_SIZE)
        c.fill_blocks(ino, [(0, blocks[0])])

        def reader():
            with open(m / "f.bin", "rb") as f:
                f.seek(2 * BLOCK_SIZE)
                assert f.read(BLOCK_SIZE) == blocks[2]

        pid = fork_child(reader)
        wait_until(lambda: m.status()["pending_reads"] > 0, timeout=30)
        c.fill_blocks(ino, [(i, blocks[i]) for i in (1, 2, 3)])
        assert wait_child(pid, timeout=60) == 0


def test_interrupt_ends_a_waiting_read_at_once(empty_mount):
    """O_DIRECT reads are synchronous FUSE requests, which a signal
    interrupts (page-cache readahead is not: dead readers of those are
    found by the opener check)."""
    m = empty_mount
    m.restart(read_timeout=None)
    with m.client() as c:
        c.create_file(ROOT_INO, "never.bin", size=MiB)

    def reader():
        fd = os.open(m / "never.bin", os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK_SIZE)
        os.preadv(fd, [buf], 0)
        os._exit(3)  # never reached: the read waits until the signal

    pid = fork_child(reader)
    wait_until(lambda: m.status()["pending_reads"] == 1, timeout=30)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    wait_until(lambda: m.status()["pending_reads"] == 0, timeout=10)
    assert requests(m).get("INTERRUPT", 0) >= 1
    assert requests(m).get("interrupted", 0) >= 1


def test_listings_stay_in_the_kernel_and_a_loader_change_invalidates_them(empty_mount):
    m = empty_mount
    with m.client() as c:
        c.create_file(ROOT_INO, "a", size=0)
        assert sorted(os.listdir(m.path)) == ["a"]
        before = requests(m)
        assert sorted(os.listdir(m.path)) == ["a"]
        after = requests(m)
        assert after.get("READDIRPLUS", 0) + after.get("READDIR", 0) == \
            before.get("READDIRPLUS", 0) + before.get("READDIR", 0)
        c.create_file(ROOT_INO, "b", size=0)
        assert sorted(os.listdir(m.path)) == ["a", "b"]
        c.unlink(ROOT_INO, "a")
        assert sorted(os.listdir(m.path)) == ["b"]


needs_passthrough = pytest.mark.skipif(
    not possible(), reason="FUSE passthrough needs CAP_SYS_ADMIN")


def skip_without_passthrough(m) -> None:
    status = fuse_status(m)
    if status["io_mode"] != "passthrough":
        pytest.skip(f"kernel without FUSE passthrough (CONFIG_FUSE_PASSTHROUGH): {status['notes']}")


def wait_passthrough(m, count: int) -> None:
    wait_until(lambda: fuse_status(m).get("passthrough", {}).get(
        "files_passthrough", 0) >= count, timeout=60)


@needs_passthrough
def test_complete_files_go_passthrough_after_their_first_open(tmp_path, image):
    img, src, data = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        skip_without_passthrough(m)
        path = m.path / "big.bin"
        assert path.read_bytes() == data  # cached mode; expansion starts
        wait_passthrough(m, 1)
        reads = requests(m).get("READ", 0)
        drop_page_cache(path)
        with open(path, "rb") as f:
            assert f.read() == data
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                assert mm[5 * MiB:5 * MiB + 100] == data[5 * MiB:5 * MiB + 100]
        assert requests(m).get("READ", 0) == reads  # the kernel read the plain file
        assert fuse_status(m)["passthrough"]["passthrough_opens"] >= 1
        plain = plain_directory(img)
        assert stat.S_IMODE(plain.stat().st_mode) == 0o700
        files = list(plain.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o400 for f in files)
        assert all(f.stat().st_uid == 0 for f in files)


@needs_passthrough
def test_an_inode_switches_only_after_its_cached_opens_close(tmp_path, image):
    img, src, data = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        skip_without_passthrough(m)
        path = m.path / "big.bin"
        held = open(path, "rb")  # a cached-mode open, kept
        try:
            wait_passthrough(m, 1)
            opens = fuse_status(m)["passthrough"]["passthrough_opens"]
            with open(path, "rb") as again:  # must stay cached: one is still open
                assert again.read() == data
            assert fuse_status(m)["passthrough"]["passthrough_opens"] == opens
            assert held.read() == data
        finally:
            held.close()
        # RELEASE reaches the daemon after close() returns
        wait_until(lambda: fuse_status(m)["passthrough"]["cached_opens"] == 0, timeout=10)
        with open(path, "rb") as f:
            assert f.read() == data
        with open(path, "rb") as f:
            assert f.read(100) == data[:100]
        assert fuse_status(m)["passthrough"]["passthrough_opens"] > opens


@needs_passthrough
def test_a_remount_reverifies_plain_files_and_refuses_a_tampered_one(tmp_path, image):
    img, src, data = image
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        skip_without_passthrough(m)
        (m.path / "big.bin").read_bytes()
        wait_passthrough(m, 1)
    plain = [p for p in plain_directory(img).iterdir() if p.stat().st_size == len(data)][0]
    os.chmod(plain, 0o600)
    with open(plain, "r+b") as f:
        f.seek(MiB)
        f.write(b"X")
    os.chmod(plain, 0o400)
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        assert (m.path / "big.bin").read_bytes() == data
        wait_passthrough(m, 1)
        counters = fuse_status(m)["passthrough"]
        assert counters["files_expanded"] == 1 and counters["files_reverified"] == 0
        drop_page_cache(m.path / "big.bin")
        assert (m.path / "big.bin").read_bytes() == data


def test_passthrough_off_serves_everything_from_the_daemon(tmp_path, image):
    img, src, data = image
    with mounted(tmp_path, str(img), allow_unsigned=True, passthrough=False) as m:
        path = m.path / "big.bin"
        assert path.read_bytes() == data
        drop_page_cache(path)
        reads = requests(m).get("READ", 0)
        assert path.read_bytes() == data
        assert requests(m)["READ"] > reads
        assert fuse_status(m)["io_mode"] == "daemon"
        assert not plain_directory(img).exists()


def test_posix_metadata_is_served_as_stored(tmp_path, posix_tree, incfs):
    """Owners, whole modes, devices, fifos, sockets, hard links and every
    stored xattr, through the kernel (root's mount shows owners as stored)."""
    img = tmp_path / "posix.img"
    incfs("pack", str(posix_tree), str(img))
    with mounted(tmp_path, str(img), allow_unsigned=True, devices=True) as m:
        for path, st in source_entries(posix_tree).items():
            got = os.lstat(m.path / os.fsdecode(path[1:]))
            for field in ("st_mode", "st_uid", "st_gid", "st_nlink", "st_mtime_ns"):
                assert getattr(got, field) == getattr(st, field), (path, field)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert (os.major(got.st_rdev), os.minor(got.st_rdev)) == \
                    (os.major(st.st_rdev), os.minor(st.st_rdev)), path
            if stat.S_ISREG(st.st_mode):
                assert got.st_size == st.st_size, path
            full = m.path / os.fsdecode(path[1:])
            assert xattrs_of(full) == xattrs_of(posix_tree / os.fsdecode(path[1:])), path
        with open(m.path / "dev" / "null", "rb") as f:  # a device node of the image works
            assert f.read() == b""
    with mounted(tmp_path, str(img), allow_unsigned=True, owners="mine") as m:
        assert os.lstat(m.path / "tmp").st_uid == os.getuid()
        with pytest.raises(PermissionError):  # nodev by default
            open(m.path / "dev" / "null", "rb")


def test_copy_tools_take_only_the_images_xattrs(tmp_path, posix_tree, incfs):
    """incfs's own user.incfs.* attributes are readable by name but not
    listed, so `cp -a` and `tar --xattrs` out of a mount carry exactly the
    attributes the image holds (ACLs and capabilities included)."""
    import tarfile
    img = tmp_path / "posix.img"
    incfs("pack", str(posix_tree), str(img))
    copy, archive = tmp_path / "copy", tmp_path / "out.tar"
    with mounted(tmp_path, str(img), allow_unsigned=True) as m:
        assert os.getxattr(m.path / "doc.txt", "user.incfs.file_id")  # there, by name
        subprocess.run(["cp", "-a", str(m.path), str(copy)], check=True)
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "-C",
                        str(m.path), "-cf", str(archive), "."], check=True, capture_output=True)
    for path in source_entries(posix_tree):
        rel = os.fsdecode(path[1:])
        assert xattrs_of(copy / rel) == xattrs_of(posix_tree / rel), rel
    with tarfile.open(archive) as tf:
        for ti in tf.getmembers():
            if ti.islnk():
                continue  # a hard link's attributes are its first name's
            names = {k.removeprefix("SCHILY.xattr.") for k in ti.pax_headers
                     if k.startswith("SCHILY.xattr.")}
            want = {os.fsdecode(n) for n in xattrs_of(posix_tree / ti.name)}
            assert names == want, ti.name


def test_the_images_acls_decide_access(tmp_path, incfs):
    """POSIX_ACL is negotiated, so the kernel checks a stored access ACL:
    user:1234:r-- lets uid 1234 read a 0640 root:root file, others not."""
    from conftest import ACL
    src = tmp_path / "src"
    src.mkdir()
    (src / "doc").write_bytes(b"for 1234\n")
    os.chmod(src / "doc", 0o640)
    try:
        os.setxattr(src / "doc", "system.posix_acl_access", ACL)
    except OSError as e:
        pytest.skip(f"kernel feature missing: POSIX ACLs on the file system under {tmp_path}: "
                    f"{e.strerror}")
    img = tmp_path / "acl.img"
    incfs("pack", str(src), str(img))
    base = Path(tempfile.mkdtemp(prefix="incfs-acl-"))  # others must reach the mount
    os.chmod(base, 0o755)
    try:
        with mounted(base, str(img), allow_unsigned=True) as m:
            def cat_as(uid: int) -> subprocess.CompletedProcess:
                return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                       "--clear-groups", "cat", str(m.path / "doc")],
                                      capture_output=True)
            assert cat_as(1234).stdout == b"for 1234\n"
            denied = cat_as(1235)
            assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_passthrough
def test_a_file_that_arrives_whole_is_expanded_before_its_next_open(empty_mount):
    m = empty_mount
    skip_without_passthrough(m)
    data = os.urandom(8 * BLOCK_SIZE)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "arrived.bin", size=len(data))
        c.fill_blocks(ino, [(i, data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in range(8)])
    wait_passthrough(m, 1)  # no open needed
    reads = requests(m).get("READ", 0)
    assert (m.path / "arrived.bin").read_bytes() == data
    assert requests(m).get("READ", 0) == reads
    assert os.getxattr(m.path / "arrived.bin", "user.incfs.io") == b"passthrough"


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = libc.closedir.argtypes = libc.telldir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    return libc


def _read_names(libc, d, count: int | None = None) -> list[bytes]:
    out = []
    while count is None or len(out) < count:
        ent = libc.readdir(d)
        if not ent:
            break
        out.append(ent.contents.d_name)
    return [n for n in out if n not in (b".", b"..")]


def test_a_big_directory_lists_every_name_once_with_its_type_and_seeks(tmp_path, incfs):
    """Several READDIR replies' worth of names, of every length: each comes
    once with its d_type, telldir/seekdir resume where they said, and a walk
    that needs only names and types sends no LOOKUP for the files."""
    src = tmp_path / "src" / "big"
    src.mkdir(parents=True)
    names = {f"f{i:04d}" + "x" * (i % 240) for i in range(3000)}
    for name in names:
        (src / name).write_bytes(b"")
    for i in range(20):
        (src / f"sub{i}").mkdir()
    os.symlink("f0000", src / "link")
    img = tmp_path / "big.img"
    incfs("pack", str(tmp_path / "src"), str(img))
    expected = {os.fsencode(n) for n in os.listdir(src)}
    with mounted(tmp_path, str(img), allow_unsigned=True) as m, m.client() as c:
        before = c.status()["fuse"]["requests"]
        found = subprocess.run(["find", str(m.path / "big")], capture_output=True, check=True)
        after = c.status()["fuse"]["requests"]
        # big and its subdirectories at most, none of the files
        assert after.get("LOOKUP", 0) - before.get("LOOKUP", 0) <= 21
        listed = [os.fsencode(os.path.basename(p)) for p in found.stdout.splitlines()[1:]]
        assert sorted(listed) == sorted(expected)
        with os.scandir(m.path / "big") as it:
            kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it}
        assert kinds["sub3"] == (True, False) and kinds["link"] == (False, True)
        assert kinds["f0001x"] == (False, False) and len(kinds) == len(expected)
        libc = _libc()
        d = libc.opendir(os.fsencode(m.path / "big"))
        assert d
        try:
            head = _read_names(libc, d, 1500)
            where = libc.telldir(d)
            rest = _read_names(libc, d)
            libc.seekdir(d, where)
            again = _read_names(libc, d)
        finally:
            libc.closedir(d)
        assert again == rest and sorted(head + rest) == sorted(expected)
        assert len(head + rest) == len(set(head + rest))
        # a stat of every name (ls -l) still works, and matches the tree
        for name in sorted(expected)[::97]:
            assert os.lstat(m.path / "big" / os.fsdecode(name)).st_mode == \
                os.lstat(src / os.fsdecode(name)).st_mode
