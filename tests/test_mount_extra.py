"""Beyond the seed, on real mounts: verification (R7) end to end, damaged
backing images, mmap, readers that die while waiting, who may use the
control socket, unmodified programs on a packed image, read-only-ness,
xattrs, stable inode numbers and the status file."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lz4.block
import pytest
from mounting import (MiB, errno_of, fork_child, kill_children, mounted, mounts,
                      wait_child, wait_until)

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import wire
from incfs.control.client import FillError
from incfs.image import Image
from incfs.integrity.merkle import tree_of_bytes
from incfs.pack import pack
from incfs.reader_watch import LOOK_EVERY

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i:i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]


def read_block(path, index: int) -> bytes:
    """One block read on its own: readahead off, so the kernel asks the daemon
    for exactly this block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
    finally:
        os.close(fd)


# --- verification of filled blocks (R7) -----------------------------------------------

def test_tampered_block_is_refused_and_never_served(mounts):
    m = mounts(read_timeout=1.0)
    data = random.Random(7).randbytes(300 * BLOCK_SIZE + 5)
    root, hash_blocks = tree_of_bytes(data)
    assert len(hash_blocks) == 4  # three level-0 blocks and their parent
    blocks = blocks_of(data)
    bad = 7
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "verified", len(data), root_hash=root)

        # a data block cannot be checked before the hash blocks above it
        with pytest.raises(FillError) as raised:
            c.fill_blocks(ino, [(0, blocks[0])])
        assert raised.value.errno == errno.ENODATA

        # a tampered hash block is refused too
        wrong = bytearray(hash_blocks[1])
        wrong[0] ^= 0xFF
        with pytest.raises(FillError) as raised:
            c.fill_blocks(ino, [(0, hash_blocks[0], "none", "hash"),
                                (1, bytes(wrong), "none", "hash")])
        assert raised.value.errno == errno.EBADMSG
        c.fill_blocks(ino, [(s, hb, "none", "hash") for s, hb in enumerate(hash_blocks)])

        tampered = bytearray(blocks[bad])
        tampered[100] ^= 0x01
        good = [(i, b) for i, b in enumerate(blocks) if i != bad]
        with pytest.raises(FillError) as raised:
            c.fill_blocks(ino, good + [(bad, bytes(tampered))])
        assert isinstance(raised.value, OSError)
        assert raised.value.errno == errno.EBADMSG
        assert raised.value.result["stored"] == len(blocks) - 1  # the rest is stored
        assert [e["index"] for e in raised.value.result["errors"]] == [bad]
        # compressed, the tampered block fails the same way
        with pytest.raises(FillError) as raised:
            c.fill_blocks(ino, [(bad, lz4.block.compress(bytes(tampered), store_size=False),
                                 "lz4")])
        assert raised.value.errno == errno.EBADMSG
        assert c.filled_ranges(ino) == [(0, bad), (bad + 1, len(blocks))]
        assert c.status()["verify_failures"] >= 3

    path = m / "verified"
    for i in (0, bad - 1, bad + 1, len(blocks) - 1):
        assert read_block(path, i) == blocks[i]
    started = time.monotonic()
    with pytest.raises(OSError) as raised:  # waits for a good block, then times out
        read_block(path, bad)
    assert raised.value.errno == errno.ETIME
    assert time.monotonic() - started >= 0.9

    with m.client() as c:  # a retry from another source is allowed
        assert c.fill_blocks(ino, [(bad, blocks[bad])]) == 1
    assert path.read_bytes() == data


def test_a_loader_sends_whole_groups_without_their_leaves(mounts):
    """FILL_BLOCKS `leaves`: the leaf is built from the 128 blocks under it
    and checked against its parent; with one block wrong it is refused and
    nothing under it is stored until the real leaf comes."""
    m = mounts(read_timeout=1.0)
    data = random.Random(8).randbytes(300 * BLOCK_SIZE + 5)
    root, hash_blocks = tree_of_bytes(data)  # the top, then three leaves
    blocks = blocks_of(data)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "built", len(data), root_hash=root)
        c.fill_blocks(ino, [(0, hash_blocks[0], "none", "hash")])
        whole = [(i, blocks[i]) for i in range(128)]
        assert c.fill_blocks(ino, whole, leaves=[1]) == 129  # 128 data blocks and the leaf

        tampered = bytearray(blocks[130])
        tampered[0] ^= 0x01
        second = [(i, blocks[i]) for i in range(128, 256) if i != 130] + [(130, bytes(tampered))]
        with pytest.raises(FillError) as raised:
            c.fill_blocks(ino, second, leaves=[2])
        answer = raised.value.result
        assert (answer["stored"], answer["leaves_built"], answer["leaves_refused"]) == (0, [], [2])
        assert {e["errno"] for e in answer["errors"]} == {errno.ENODATA}
        with pytest.raises(FillError) as raised:  # the real leaf: all but the tampered block
            c.fill_blocks(ino, [(2, hash_blocks[2], "none", "hash")] + second)
        assert [e["index"] for e in raised.value.result["errors"]] == [130]
        last = [(i, blocks[i]) for i in range(256, len(blocks))] + [(130, blocks[130])]
        assert c.fill_blocks(ino, last, leaves=[3]) == len(blocks) - 256 + 2
    assert (m / "built").read_bytes() == data


def _pack_one(tmp_path: Path, name: str, data: bytes, compress: str = "none") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(data)
    (src / "other.txt").write_bytes(b"untouched\n" * 1000)
    img = tmp_path / "packed.img"
    pack(src, img, compress=compress)
    return img


def _flip_stored_block(img: Path, name: bytes, index: int) -> None:
    with Image.open(img) as im:
        node = im.ns.lookup(ROOT_INO, name)
        offset, _info, _crc = node.data.get(index)
    with open(img, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0x55]))


def test_corrupted_block_on_disk_fails_with_eio(mounts, tmp_path):
    data = random.Random(3).randbytes(64 * BLOCK_SIZE)
    img = _pack_one(tmp_path, "a.bin", data)
    _flip_stored_block(img, b"a.bin", 10)
    m = mounts(str(img), allow_unsigned=True)
    assert errno_of(read_block, m / "a.bin", 10) == errno.EIO
    for i in (0, 9, 11, 63):
        assert read_block(m / "a.bin", i) == data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
    assert (m / "other.txt").read_bytes() == b"untouched\n" * 1000
    assert m.status()["verify_failures"] >= 1


def test_corrupted_block_without_a_tree_fails_its_crc(mounts, tmp_path):
    """A file a loader filled without a root hash is still CRC-checked."""
    data = random.Random(4).randbytes(16 * BLOCK_SIZE)
    m = mounts(keep_cache=True)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "plain", len(data))
        c.fill_blocks(ino, list(enumerate(blocks_of(data))))
    m.stop()
    _flip_stored_block(m.cache, b"plain", 5)
    m.start()
    assert errno_of(read_block, m / "plain", 5) == errno.EIO
    assert read_block(m / "plain", 4) == data[4 * BLOCK_SIZE:5 * BLOCK_SIZE]
    assert read_block(m / "plain", 6) == data[6 * BLOCK_SIZE:7 * BLOCK_SIZE]


# --- mmap, dead readers ---------------------------------------------------------------

def _mmap_compare(path: str, want: bytes) -> None:
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == want


def test_mmap_reads_wait_for_blocks(mounts):
    m = mounts()
    data = random.Random(5).randbytes(200 * BLOCK_SIZE + 123)
    root, hash_blocks = tree_of_bytes(data)
    blocks = blocks_of(data)
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "mapped", len(data), root_hash=root)
        c.fill_blocks(ino, [(s, hb, "none", "hash") for s, hb in enumerate(hash_blocks)])
        c.fill_blocks(ino, [(i, blocks[i]) for i in range(0, len(blocks), 2)])
        child = fork_child(_mmap_compare, str(m / "mapped"), data)
        try:
            wait_until(lambda: m.pending(), what="the mmap reader to wait")
            assert os.waitpid(child, os.WNOHANG)[0] == 0  # still waiting
            c.fill_blocks(ino, [(i, blocks[i]) for i in range(1, len(blocks), 2)])
            assert wait_child(child, 60) == 0
        finally:
            kill_children([child])
    assert m.pending() == []


def _read_first_block(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        f.read(BLOCK_SIZE)


def test_killed_reader_leaves_no_pending_read(mounts):
    m = mounts(read_timeout=None)  # wait forever: only the reader's death ends it
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "never", 10 * BLOCK_SIZE)
        other = c.create_file(ROOT_INO, "later", 10 * BLOCK_SIZE)
    victim = fork_child(_read_first_block, str(m / "never"))
    survivor = fork_child(_read_first_block, str(m / "later"))
    try:
        wait_until(lambda: len(m.pending()) >= 2, what="both readers to wait")
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        killed = time.monotonic()
        # `.incfs/pending` lines: serial ino data|hash block time_ns
        wait_until(lambda: all(line.split()[1] != str(ino) for line in m.pending()), timeout=8,
                   what="the dead reader's pending reads to go")
        swept = time.monotonic() - killed
        assert swept < 5.0  # at once (a pidfd); the margin is for a busy machine
        # the live reader still waits (for what the kernel's readahead asked
        # with its block), and gets its data
        assert {line.split()[1] for line in m.pending()} == {str(other)}
        with m.client() as c:
            c.fill_blocks(other, [(i, bytes(range(256)) * 16) for i in range(10)])
        assert wait_child(survivor, 30) == 0
    finally:
        kill_children([victim, survivor])
    assert m.pending() == []
    with m.client() as c:
        assert c.pending_reads(timeout=0) == []
        assert c.status()["reads_abandoned"] >= 1


def _read_opened_by_a_thread(path: str, want: bytes) -> None:
    """Open in a thread that then ends; read in the main thread."""
    import threading
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(path, os.O_RDONLY)))
    opener.start()
    opener.join()
    assert os.pread(opened[0], BLOCK_SIZE, 0) == want


def _read_opened_by_a_parent(path: str, want: bytes, result: int) -> None:
    """Open, fork, and exit: the child (not waited for) reads what its parent
    opened, as a program that puts itself in the background does, and
    writes b"ok" (or what went wrong) on `result`."""
    fd = os.open(path, os.O_RDONLY)
    if os.fork() == 0:
        try:
            ok = os.pread(fd, BLOCK_SIZE, 0) == want
            os.write(result, b"ok" if ok else b"wrong bytes")
        except OSError as e:
            os.write(result, f"errno {e.errno}".encode())
        os._exit(0)


@pytest.mark.parametrize("how", ["thread", "parent"])
def test_a_read_waits_for_its_reader_not_for_the_opener(mounts, how):
    """The process whose read waits is the reader, not whoever opened the
    file: a read of a descriptor whose opener has ended (a thread, or a
    parent that forked and exited) still gets its data, however long the
    block takes."""
    m = mounts(read_timeout=None)
    block = bytes(range(256)) * 16
    with m.client() as c:
        ino = c.create_file(ROOT_INO, "late", 4 * BLOCK_SIZE)
    path = str(m / "late")
    if how == "thread":
        reader = fork_child(_read_opened_by_a_thread, path, block)
    else:
        r, w = os.pipe()
        opener = fork_child(_read_opened_by_a_parent, path, block, w)
        os.close(w)
        assert wait_child(opener, 30) == 0
    try:
        wait_until(lambda: any(line.split()[1] == str(ino) for line in m.pending()),
                   what="the read to wait")
        time.sleep(LOOK_EVERY + 0.5)  # past a look at the opener (which abandoned the read)
        with m.client() as c:
            c.fill_blocks(ino, [(i, block) for i in range(4)])
        if how == "thread":
            assert wait_child(reader, 30) == 0
        else:
            assert os.read(r, 100) == b"ok"
            os.close(r)
    finally:
        if how == "thread":
            kill_children([reader])
    with m.client() as c:
        assert c.status()["reads_abandoned"] == 0


# --- who may use the control socket ------------------------------------------------

NOBODY = 65534


def _connect_as_nobody(sock_path: str, raw: bool) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    if not raw:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(sock_path)
        except PermissionError:
            return  # refused by the 0700 directory
        raise AssertionError("a non-owner connected to the control socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sock_path)  # reachable through the test's link ...
    header = _recv_exact(sock, wire.HEADER.size)  # ... but the server refuses at once
    length, _v, op, _rid = wire.parse_header(header)
    answer, _tail = wire.decode_payload(_recv_exact(sock, length))
    assert op == wire.Op.RESPONSE
    assert answer["ok"] is False and answer["errno"] == errno.EACCES, answer
    try:
        sock.sendall(wire.encode(wire.Op.STATUS, 1, {}))
    except (BrokenPipeError, ConnectionResetError):
        return  # closed: fine
    assert _recv_rest(sock) == b"", "the server kept talking to a non-owner"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


def _recv_rest(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_non_owner_is_refused_by_the_control_socket(mounts):
    m = mounts()
    sock_path = (m / ".incfs" / "control").read_text().strip()
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700

    # 1. the 0700 directory keeps others away from the socket
    assert wait_child(fork_child(_connect_as_nobody, sock_path, False), 30) == 0

    # 2. even if they reach it (a link in an open directory, the socket made
    # world-writable for a moment), SO_PEERCRED makes the server refuse
    base = Path(sock_path).parents[2]
    open_dir = Path(tempfile.mkdtemp(prefix="incfs-peercred-", dir=base))
    try:
        os.chmod(open_dir, 0o755)
        link = open_dir / "sock"
        os.link(sock_path, link)
        os.chmod(sock_path, 0o666)
        try:
            assert wait_child(fork_child(_connect_as_nobody, str(link), True), 30) == 0
        finally:
            os.chmod(sock_path, 0o600)
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
    with m.client() as c:  # the owner still gets in
        assert c.status()["files"] == 0


# --- a packed image, and programs that do not know about incfs -----------------------

def _build_source(root: Path) -> Path:
    from conftest import build_sample_tree  # tests/conftest.py's sample tree
    build_sample_tree(root, big=6 * MiB, deep=8)
    db = root / "data.db"
    with sqlite3.connect(db) as con:
        con.execute("create table t (id integer primary key, name text, x real)")
        con.executemany("insert into t (name, x) values (?, ?)",
                        [(f"row {i}", i * 0.5) for i in range(5000)])
        con.execute("create index t_name on t (name)")
    con.close()
    pkg = root / "app"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .util import answer\nVERSION = '1.2.3'\n")
    (pkg / "util.py").write_text(
        "import json, pathlib\n"
        "def answer():\n"
        "    data = json.loads((pathlib.Path(__file__).parent / 'data.json').read_text())\n"
        "    from .sub.deep import twice\n"
        "    return twice(data['n'])\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("def twice(n):\n    return 2 * n\n")
    (pkg / "data.json").write_text(json.dumps({"n": 21}))
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    base = tmp_path_factory.mktemp("packed")
    src = _build_source(base / "src")
    img = base / "tree.img"
    pack(src, img, compress="zstd")
    return src, img


@pytest.fixture(scope="module")
def packed_mount(packed, tmp_path_factory):
    src, img = packed
    with mounted(tmp_path_factory.mktemp("packed-mnt"), str(img), allow_unsigned=True) as m:
        yield src, m


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, timeout=120, **kw)


@pytest.mark.skipif(os.geteuid() != 0, reason="the readahead window is root's to set")
def test_readahead_window_set_for_a_complete_image(packed_mount):
    """(A mount still loading gets the smaller window: tests/test_cli_mount.py.)"""
    from incfs.mount import READAHEAD_COMPLETE_KB

    dev = os.stat(packed_mount[1].path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == READAHEAD_COMPLETE_KB


def test_unmodified_tools_on_a_packed_image(packed_mount, tmp_path):
    src, m = packed_mount
    mp = m.path

    assert run("cat", mp / "text.txt").stdout == (src / "text.txt").read_bytes()
    done = run("diff", "-r", "--no-dereference", src, mp)
    assert done.returncode == 0, done.stdout + done.stderr

    copy = tmp_path / "copy"
    done = run("cp", "-a", mp, copy)
    assert done.returncode == 0, done.stderr
    done = run("diff", "-r", "--no-dereference", src, copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.stat(copy / "links" / "hard-b").st_ino == os.stat(copy / "edge-4097").st_ino
    assert os.stat(copy / "exec.sh").st_mode == os.stat(src / "exec.sh").st_mode

    listing = lambda top: sorted(  # noqa: E731
        run("find", top, "-printf", r"%P %y %m %n\n").stdout.splitlines())
    assert listing(mp) == listing(src)
    files = lambda top: sorted(  # noqa: E731
        run("find", top, "-type", "f", "-printf", r"%P %s\n").stdout.splitlines())
    assert files(mp) == files(src)
    assert b".incfs" not in run("find", mp).stdout

    tarred = run("tar", "-C", mp, "-cf", "-", ".")
    assert tarred.returncode == 0, tarred.stderr
    unpacked = tmp_path / "untar"
    unpacked.mkdir()
    assert run("tar", "-C", unpacked, "-xf", "-", input=tarred.stdout).returncode == 0
    done = run("diff", "-r", "--no-dereference", src, unpacked)
    assert done.returncode == 0, done.stdout + done.stderr

    query = "select count(*), sum(x), max(name) from t where name like 'row 1%'"
    want = run("sqlite3", src / "data.db", query).stdout
    got = run("sqlite3", mp / "data.db", query)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want and want.startswith(b"1111|")

    program = ("import sys; sys.path.insert(0, sys.argv[1]); import app; "
               "print(app.VERSION, app.answer(), app.__file__.startswith(sys.argv[1]))")
    done = run(sys.executable, "-c", program, mp, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"1.2.3", b"42", b"True"]


def test_every_modification_fails(packed_mount):
    src, m = packed_mount
    mp = m.path
    attempts = {
        "create": lambda: open(mp / "new-file", "wb"),
        "open for writing": lambda: open(mp / "one", "r+b"),
        "append": lambda: open(mp / "one", "ab"),
        "touch (utime)": lambda: os.utime(mp / "one"),
        "mkdir": lambda: os.mkdir(mp / "newdir"),
        "rm": lambda: os.unlink(mp / "one"),
        "rmdir": lambda: os.rmdir(mp / "emptydir"),
        "mv": lambda: os.rename(mp / "one", mp / "moved"),
        "mv in a dir": lambda: os.rename(mp / "links" / "hard-a", mp / "links" / "x"),
        "chmod": lambda: os.chmod(mp / "one", 0o777),
        "chown": lambda: os.chown(mp / "one", 1, 1),
        "setxattr": lambda: os.setxattr(mp / "one", "user.test", b"1"),
        "replace incfs xattr": lambda: os.setxattr(mp / "one", "user.incfs.metadata", b"x"),
        "removexattr": lambda: os.removexattr(mp / "one", "user.incfs.file_id"),
        "truncate": lambda: os.truncate(mp / "one", 0),
        "symlink": lambda: os.symlink("one", mp / "newlink"),
        "link": lambda: os.link(mp / "one", mp / "newhard"),
        "mknod fifo": lambda: os.mkfifo(mp / "fifo"),
        "write the status file": lambda: open(mp / ".incfs" / "status", "wb"),
    }
    for what, attempt in attempts.items():
        code = errno_of(attempt)
        assert code in (errno.EROFS, errno.EPERM), f"{what}: {errno.errorcode.get(code, code)}"
    for cmd in (["touch", mp / "one"], ["touch", mp / "new"], ["mkdir", mp / "d"],
                ["rm", "-f", mp / "one"], ["mv", mp / "one", mp / "two"],
                ["chmod", "777", mp / "one"], ["truncate", "-s", "0", mp / "one"]):
        done = run(*cmd)
        assert done.returncode != 0, cmd
        assert b"Read-only file system" in done.stderr or b"not permitted" in done.stderr, \
            (cmd, done.stderr)
    done = run("diff", "-r", "--no-dereference", src, mp)
    assert done.returncode == 0, done.stdout + done.stderr


def test_xattrs_and_fsverity_digests(packed_mount, mounts):
    src, m = packed_mount
    for name in ("empty", "one", "edge-4096", "edge-4097", "text.txt", "big.bin", "data.db"):
        path = m / name
        names = os.listxattr(path)
        for attr in ("user.incfs.file_id", "user.incfs.metadata", "user.incfs.verity_digest"):
            # readable by name, never listed: cp -a and tar --xattrs copy only the image's
            assert attr not in names, (name, names)
            os.getxattr(path, attr)
        want = run("fsverity", "digest", src / name).stdout.split()[0]
        assert os.getxattr(path, "user.incfs.verity_digest") == want, name
        assert len(os.getxattr(path, "user.incfs.file_id")) == 32  # 16 bytes, hex
    assert errno_of(os.getxattr, m / "one", "user.nothing") == errno.ENODATA

    # what a loader gives a file comes back as xattrs
    e = mounts()
    data = b"hello, xattrs\n" * 500
    root, hash_blocks = tree_of_bytes(data)
    file_id = bytes(range(16))
    with e.client() as c:
        ino = c.create_file(ROOT_INO, "f", len(data), file_id=file_id, metadata=b"meta\x00data",
                            root_hash=root)
        c.fill_blocks(ino, [(s, hb, "none", "hash") for s, hb in enumerate(hash_blocks)])
        c.fill_blocks(ino, list(enumerate(blocks_of(data))))
    assert os.getxattr(e / "f", "user.incfs.file_id") == file_id.hex().encode()
    assert os.getxattr(e / "f", "user.incfs.metadata") == b"meta\x00data"
    reference = e.path.parent / "f.reference"
    reference.write_bytes(data)
    want = run("fsverity", "digest", reference).stdout.split()[0]
    assert os.getxattr(e / "f", "user.incfs.verity_digest") == want
    assert os.getxattr(e / "f", "user.incfs.blocks") == b"2/2"


def _inodes(top: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, top)] = os.lstat(full).st_ino
    return out


def test_inode_numbers_are_stable_across_remount(packed, packed_mount, mounts, tmp_path):
    _src, img = packed
    # the image is in use by the module's mount: a second mount says so
    with pytest.raises(Exception, match="in use by another incfs process"):
        mounts(str(img), allow_unsigned=True)
    own = tmp_path / "own.img"
    shutil.copyfile(img, own)
    m = mounts(str(own), allow_unsigned=True)
    before = _inodes(m.path)
    assert len(set(before.values())) < len(before)  # hard links share one
    m.restart()
    assert _inodes(m.path) == before

    e = mounts(keep_cache=True)
    with e.client() as c:
        d = c.mkdir(ROOT_INO, "d")
        c.create_file(d, "f", 1)
        c.symlink(ROOT_INO, "s", "d/f")
    before = _inodes(e.path)
    e.restart()
    assert _inodes(e.path) == before


def test_status_file_is_json_with_the_contract_keys(packed_mount, mounts):
    _src, m = packed_mount
    status = json.loads((m / ".incfs" / "status").read_text())
    for key in ("files", "blocks_total", "blocks_present", "bytes_fetched", "pending_reads",
                "complete"):
        assert key in status, key
    assert status["complete"] is True and status["pending_reads"] == 0
    assert status["blocks_present"] == status["blocks_total"] > 0
    assert status["files"] > 10

    e = mounts()
    with e.client() as c:
        c.create_file(ROOT_INO, "a", 3 * BLOCK_SIZE)
        c.fill_blocks(c.lookup(ROOT_INO, "a"), [(0, bytes(BLOCK_SIZE))])
    status = e.status()
    assert (status["files"], status["blocks_total"], status["blocks_present"]) == (1, 3, 1)
    assert status["complete"] is False and status["pending_reads"] == 0
    assert isinstance(status["bytes_fetched"], int)
