"""Shared fixtures: sample source trees, keys, the real `incfs` command, and
tools to look at (and damage) the bytes of an image."""

from __future__ import annotations

import os
import random
import socket
import struct
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.format.layout import (LOG_START, RECORD_HEADER_SIZE, RecordHeader,
                                 RecordType)
from incfs.integrity import signing

MiB = 1 << 20
INCFS = Path(sys.executable).with_name("incfs")
# Mount commands start their daemons cold here, as each test expects of its
# own processes; tests/test_warm.py turns the warm process (incfs.warm) on
# for the commands it runs, in a runtime directory of its own.
os.environ["INCFS_WARM"] = "0"
ALGORITHMS = ["ed25519", "ecdsa-p256", "rsa"]


# --- source trees ----------------------------------------------------------------

def _mixed_mib(i: int, rng: random.Random) -> bytes:
    """One MiB of a kind chosen by `i`: random, zeros, text, half-zero blocks."""
    kind = i % 4
    if kind == 0:
        return rng.randbytes(MiB)
    if kind == 1:
        return bytes(MiB)
    if kind == 2:
        words = [b"alpha", b"beta", b"gamma", b"delta", b"incfs", b"block", b"merkle"]
        out, n = bytearray(), 0
        while len(out) < MiB:
            out += b"%d:%d %s %s\n" % (i, n, rng.choice(words), rng.choice(words))
            n += 1
        return bytes(out[:MiB])
    half = BLOCK_SIZE // 2
    return b"".join(rng.randbytes(half) + bytes(half) for _ in range(MiB // BLOCK_SIZE))


def build_sample_tree(root: Path, *, big: int = 50 * MiB, deep: int = 40,
                      seed: int = 1234) -> Path:
    """A tree with every edge case pack must carry: empty, 1-byte, block-edge,
    zero-filled and big files, hard links, symlinks, deep directories, long and
    non-ASCII (even non-UTF-8) names, modes, an empty directory."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    files = {
        "empty": b"",
        "one": b"\x07",
        "edge-4095": rng.randbytes(4095),
        "edge-4096": rng.randbytes(4096),
        "edge-4097": rng.randbytes(4097),
        "zeros": bytes(3 * BLOCK_SIZE + 100),
        "mixed": rng.randbytes(BLOCK_SIZE) + bytes(2 * BLOCK_SIZE) + rng.randbytes(BLOCK_SIZE)
        + bytes(10),
        "text.txt": b"".join(b"line %d of a compressible text file\n" % i for i in range(3000)),
        "dup1": b"same content " * 1000,
        "dup2": b"same content " * 1000,
        "exec.sh": b"#!/bin/sh\necho hello\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "exec.sh").chmod(0o755)
    (root / "readonly").write_bytes(b"read only\n")
    (root / "readonly").chmod(0o444)
    if big:
        with open(root / "big.bin", "wb") as f:
            for i in range(big // MiB):
                f.write(_mixed_mib(i, rng))
            f.write(rng.randbytes(big % MiB))
    links = root / "links"
    links.mkdir()
    os.link(root / "text.txt", links / "hard-a")
    os.link(root / "edge-4097", links / "hard-b")
    os.link(root / "edge-4097", root / "edge-4097-again")
    os.symlink("../one", links / "sym-rel")
    os.symlink("/etc/hostname", links / "sym-abs")
    os.symlink("does/not/exist", links / "sym-dangling")
    os.symlink("../deep", links / "sym-dir")
    d = root / "deep"
    for level in range(deep):
        d = d / f"d{level:02d}"
    d.mkdir(parents=True)
    (d / "leaf.txt").write_bytes(b"at the bottom\n")
    names = root / "names"
    names.mkdir()
    for name in ["L" * 255, "\u00e9" * 127 + "x", "\u65e5\u672c\u8a9e\u30d5\u30a1\u30a4\u30eb.txt",
                 "\u00fcmlaut-\u00df", "rocket-\U0001F680", "with space [and] {brackets}"]:
        assert len(name.encode()) <= 255
        (names / name).write_bytes(name.encode() + b"\n")
    with open(os.path.join(os.fsencode(names), b"\xff\xfe-not-utf8"), "wb") as f:
        f.write(b"bytes name\n")
    (root / "emptydir").mkdir()
    return root


@pytest.fixture
def sample_tree(tmp_path_factory):
    """Factory: `sample_tree(big=..., deep=...)` builds a fresh source tree."""
    def make(**kwargs) -> Path:
        return build_sample_tree(tmp_path_factory.mktemp("src") / "tree", **kwargs)
    return make


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory) -> Path:
    """A session-wide sample tree without the big file (read-only: do not change)."""
    return build_sample_tree(tmp_path_factory.mktemp("small") / "tree", big=0, deep=8)


# --- comparing an image with its source ------------------------------------------

def source_entries(src: Path) -> dict[bytes, os.stat_result]:
    """"/"-rooted relative bytes path -> lstat, for every entry under src."""
    base = os.fsencode(src)
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[b"/" + os.path.relpath(full, base)] = os.lstat(full)
    return out


def assert_image_matches(img, src: Path) -> None:
    """Every name, type, mode, size, mtime, symlink target, hard link and every
    byte of every file read back through the library equals the source."""
    from incfs.format.records import InodeFlags

    entries = source_entries(src)
    in_image = {p: n for p, n in img.ns.walk() if p}
    assert set(in_image) == set(entries)
    groups: dict[tuple[int, int], set[int]] = {}
    for path, st in entries.items():
        node = in_image[path]
        assert stat.S_IFMT(node.mode) == stat.S_IFMT(st.st_mode), path
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(node.mode) == stat.S_IMODE(st.st_mode), path
        assert node.mtime_ns == st.st_mtime_ns, path
        full = os.fsencode(src) + path
        if stat.S_ISLNK(st.st_mode):
            assert node.target == os.readlink(full)
        elif stat.S_ISREG(st.st_mode):
            groups.setdefault((st.st_dev, st.st_ino), set()).add(node.ino)
            assert node.size == st.st_size, path
            assert node.flags & InodeFlags.HAS_TREE
            assert node.complete, path
            assert node.nlink == st.st_nlink, path
            with open(full, "rb") as f:
                offset = 0
                while True:
                    want = f.read(4 * MiB)
                    got = img.read_range(node, offset, 4 * MiB)
                    assert got == want, (path, offset)
                    if not want:
                        break
                    offset += len(want)
    # hard links: one inode per source inode, different inodes apart
    inos = [g for g in groups.values()]
    assert all(len(g) == 1 for g in inos)
    assert len({next(iter(g)) for g in inos}) == len(inos)


@pytest.fixture
def compare_tree():
    return assert_image_matches


# --- the command line -------------------------------------------------------------

def run_incfs(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run the installed `incfs` command; returns the finished process."""
    cmd = [str(INCFS)] if INCFS.exists() else [sys.executable, "-m", "incfs.cli"]
    return subprocess.run(cmd + [os.fspath(a) for a in args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture
def incfs():
    return run_incfs


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int = 2,
                          contains: str | None = None) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("incfs: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if contains:
        assert contains in lines[0], lines[0]


@pytest.fixture
def one_line_error():
    return assert_one_line_error


# --- keys ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """keys(algorithm, n=0) -> (private path, public path), made once per session."""
    made: dict[tuple[str, int], tuple[Path, Path]] = {}
    directory = tmp_path_factory.mktemp("keys")

    def get(algorithm: str, n: int = 0) -> tuple[Path, Path]:
        if (algorithm, n) not in made:
            made[(algorithm, n)] = signing.write_keypair(
                directory / f"{algorithm}-{n}", signing.ALGORITHM_NAMES[algorithm])
        return made[(algorithm, n)]
    return get


# --- raw image bytes ----------------------------------------------------------------

class RawImage:
    """The bytes of an image file, with its records listed and editable."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = bytearray(self.path.read_bytes())

    def records(self) -> list[tuple[int, RecordHeader]]:
        """(offset, header) of each record, stopping at the first bad one."""
        out, offset = [], LOG_START
        while offset + RECORD_HEADER_SIZE <= len(self.data):
            header = RecordHeader.decode(bytes(self.data[offset:offset + RECORD_HEADER_SIZE]))
            if header is None or offset + header.length > len(self.data):
                break
            out.append((offset, header))
            offset += header.length
        return out

    def boundaries(self) -> list[int]:
        """Offsets where a record starts, plus the end of the last one."""
        recs = self.records()
        return [o for o, _ in recs] + [recs[-1][0] + recs[-1][1].length]

    def of_type(self, rtype: RecordType) -> list[tuple[int, RecordHeader]]:
        return [(o, h) for o, h in self.records() if h.type == rtype]

    def body(self, offset: int) -> bytes:
        header = RecordHeader.decode(bytes(self.data[offset:offset + RECORD_HEADER_SIZE]))
        start = offset + RECORD_HEADER_SIZE
        return bytes(self.data[start:start + header.body_len])

    def set_body(self, offset: int, body: bytes) -> None:
        """Replace a record's body (same length) and fix its CRC, so only a
        higher-level check (signature, Merkle tree) can notice."""
        raw = bytes(self.data[offset:offset + RECORD_HEADER_SIZE])
        header = RecordHeader.decode(raw)
        assert len(body) == header.body_len
        start = offset + RECORD_HEADER_SIZE
        self.data[start:start + len(body)] = body
        self.data[offset:offset + RECORD_HEADER_SIZE] = header.encode(body)

    def flip(self, offset: int, mask: int = 0x01) -> None:
        self.data[offset] ^= mask

    def set_block_crc(self, ino: int, tree: int, index: int, crc: int) -> None:
        """Rewrite the CRC of one block in its BLOCKS record (and the record's
        own CRC), so that only the Merkle tree stands between its bytes and
        a reader."""
        for offset, _h in self.of_type(RecordType.BLOCKS):
            body = bytearray(self.body(offset))
            (count,) = struct.unpack_from("<I", body)
            pos = 4
            for _ in range(count):
                r_ino, r_tree, first, n, _base = struct.unpack_from("<QBxxxIIQ", body, pos)
                if r_ino == ino and r_tree == tree and first <= index < first + n:
                    struct.pack_into("<I", body, pos + 28 + 6 * (index - first) + 2, crc)
                    self.set_body(offset, bytes(body))
                    return
                pos += 28 + 6 * n
        pytest.fail("block not found in any BLOCKS record")

    def forge_block(self, offset: int, size: int, ino: int, tree: int, index: int) -> None:
        """Change a stored block's first byte and give it the CRC of its new
        bytes: it passes every check but the Merkle tree's."""
        self.flip(offset, 0x01)
        self.set_block_crc(ino, tree, index, zlib.crc32(bytes(self.data[offset:offset + size])))

    def save(self, path: Path | None = None) -> Path:
        target = Path(path or self.path)
        target.write_bytes(bytes(self.data))
        return target


def block_location(image: Path, path: bytes, tree: int, index: int):
    """(ino, offset, stored size, crc) of a block of the file at `path`."""
    from incfs.image import Image

    with Image.open(image) as img:
        node = img.ns.get(ROOT_INO)
        for part in path.strip(b"/").split(b"/"):
            node = img.ns.lookup(node.ino, part)
        bmap = node.data if tree == 0 else node.hashes
        offset, info, crc = bmap.get(index)
        return node.ino, offset, info & 0x1FFF, crc


@pytest.fixture
def raw_image():
    return RawImage


def crc32(data: bytes) -> int:
    return zlib.crc32(data)


# --- a tree with the whole of POSIX metadata ---------------------------------------

# vfs_cap_data revision 2: cap_net_bind_service (bit 10) permitted and effective
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
# posix_acl_xattr: version 2, then (tag, perm, id) entries: user::rw- user:1234:r--
# group::r-- mask::r-- other::---
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF)))


def xattrs_of(path: Path) -> dict[bytes, bytes]:
    out = {}
    for name in os.listxattr(path, follow_symlinks=False):
        out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
    return out


@pytest.fixture
def posix_tree(tmp_path) -> Path:
    """Owners, the whole mode, devices, a fifo, a socket, xattrs in every
    namespace root may set, hard links of several types."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown, mknod, trusted.* xattrs)")
    src = tmp_path / "posix"
    src.mkdir()
    (src / "bin").mkdir()
    chage = src / "bin" / "chage"
    chage.write_bytes(b"\x7fELF pretend\n" * 500)
    os.chown(chage, 0, 42)  # root:shadow
    os.chmod(chage, 0o2755)  # setgid
    su = src / "bin" / "su"
    su.write_bytes(b"su\n")
    os.chmod(su, 0o4755)  # setuid
    ping = src / "bin" / "ping"
    ping.write_bytes(b"ping\n")
    os.setxattr(ping, b"security.capability", CAPABILITY)
    os.link(ping, src / "bin" / "ping-link")
    tmp = src / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)  # sticky
    os.chown(tmp, 1000, 1000)
    dev = src / "dev"
    dev.mkdir()
    os.mknod(dev / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(dev / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.chown(dev / "sda", 0, 6)
    os.mknod(dev / "big", stat.S_IFCHR | 0o600, os.makedev(4095, 1048575))  # wide numbers
    os.link(dev / "null", dev / "null-link")  # a hard link to a device
    os.mkfifo(dev / "initctl", 0o600)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fsdecode(dev / "log"))
    sock.close()
    os.chmod(dev / "log", 0o666)
    doc = src / "doc.txt"
    doc.write_bytes(b"hello\n")
    os.chown(doc, 70000, 4000000000)  # ids beyond 16 bits
    os.setxattr(doc, b"user.mime_type", b"text/plain")
    os.setxattr(doc, b"user.empty", b"")
    os.setxattr(doc, b"user.binary", bytes(range(256)) * 4)  # ext4 keeps <= 4 KiB in all
    os.setxattr(doc, b"trusted.overlay.opaque", b"y")
    try:
        os.setxattr(doc, b"system.posix_acl_access", ACL)
    except OSError:
        pass  # the file system has no ACLs; the rest still counts
    os.symlink("doc.txt", src / "link")
    os.lchown(src / "link", 5, 6)
    os.setxattr(src / "link", b"trusted.symlink", b"on the link itself", follow_symlinks=False)
    os.chown(src, 0, 0)
    os.setxattr(src, b"user.root", b"root dir")
    for p in [src, *src.rglob("*")]:
        os.utime(p, ns=(1_700_000_000_123_456_789, 1_700_000_000_987_654_321),
                 follow_symlinks=False)
    return src


