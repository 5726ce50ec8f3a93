"""Pack inputs: tar archives (plain, gzip, zstd; GNU and PAX; stdin), OCI
image layouts, and hostile archives. Every test makes its own archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from conftest import CAPABILITY, run_incfs, xattrs_of
from incfs.errors import UsageError
from incfs.image import Image
from incfs.inputs import open_input
from incfs.pack import pack
from incfs.verify import verify_image

T0 = 1_700_000_000


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = fields.pop("mtime", T0)
    ti.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    for key, value in fields.items():
        setattr(ti, key, value)
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        ti.size = len(data)
    return ti, data


def tar_bytes(members, fmt=tarfile.PAX_FORMAT, compress: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    raw = buf.getvalue()
    if compress == "gz":
        return gzip.compress(raw)
    if compress == "zst":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def sample_members():
    long_dir = "d" * 100 + "/" + "e" * 120
    return [
        member("./", tarfile.DIRTYPE, mode=0o700, uid=0, gid=0),
        member("etc", tarfile.DIRTYPE),
        member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", uid=0, gid=0),
        member("etc/shadow", data=b"root:*:19000::::::\n", mode=0o640, gid=42),
        member("usr/bin/chage", data=b"\x7fELF" * 1000, mode=0o2755, gid=42),
        member("usr/bin/ping", data=b"ping", pax_headers={
            "SCHILY.xattr.security.capability": CAPABILITY.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.note": "ünïcode"}),
        member("usr/bin/ping6", tarfile.LNKTYPE, linkname="usr/bin/ping"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6),
        member("dev/initctl", tarfile.FIFOTYPE, mode=0o600),
        member("tmp", tarfile.DIRTYPE, mode=0o1777),
        member("outside", tarfile.SYMTYPE, linkname="../../../../etc/shadow"),
        member("abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member(long_dir + "/" + "f" * 200, data=b"long name\n", uid=70000, gid=4000000000),
        member("big", data=os.urandom(3 * 4096 + 5)),
        member("precise", data=b"", pax_headers={"mtime": "1700000000.123456789"}),
        # GNU keeps these in ././@LongLink members ('K' for a long target)
        member("etc/passwd-", tarfile.LNKTYPE, linkname="etc/passwd"),
        member("long-target", tarfile.SYMTYPE, linkname="../" + "t" * 250),
    ]


def _check_links(nodes: dict) -> None:
    passwd = nodes[b"/etc/passwd"]
    assert nodes[b"/etc/passwd-"].ino == passwd.ino and passwd.nlink == 2
    assert nodes[b"/long-target"].target == b"../" + b"t" * 250


def _by_path(img: Image) -> dict[bytes, object]:
    return {p: n for p, n in img.ns.walk()}


def _check_sample(img: Image) -> None:
    nodes = _by_path(img)
    root = nodes[b""]
    assert root.mode == stat.S_IFDIR | 0o700
    assert nodes[b"/etc/shadow"].mode == stat.S_IFREG | 0o640 and nodes[b"/etc/shadow"].gid == 42
    assert nodes[b"/usr/bin/chage"].mode == stat.S_IFREG | 0o2755
    assert nodes[b"/usr"].mode == stat.S_IFDIR | 0o755 and nodes[b"/usr"].mtime_ns == 0  # implied
    ping = nodes[b"/usr/bin/ping"]
    assert ping is nodes[b"/usr/bin/ping6"] and ping.nlink == 2
    assert dict(ping.xattrs) == {b"security.capability": CAPABILITY,
                                 b"user.note": "ünïcode".encode()}
    null = nodes[b"/dev/null"]
    assert stat.S_ISCHR(null.mode) and (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
    assert stat.S_ISBLK(nodes[b"/dev/sda"].mode) and nodes[b"/dev/sda"].gid == 6
    assert stat.S_ISFIFO(nodes[b"/dev/initctl"].mode)
    assert nodes[b"/tmp"].mode == stat.S_IFDIR | 0o1777
    assert nodes[b"/outside"].target == b"../../../../etc/shadow"  # stored as given
    assert nodes[b"/abs"].target == b"/etc/passwd"
    long = [n for p, n in nodes.items() if p.endswith(b"f" * 200)][0]
    assert (long.uid, long.gid) == (70000, 4000000000)
    assert img.read_range(long, 0, 100) == b"long name\n"
    assert nodes[b"/precise"].mtime_ns == 1_700_000_000_123_456_789
    assert nodes[b"/etc/passwd"].mtime_ns == T0 * 10**9
    assert img.read_range(nodes[b"/usr/bin/chage"], 0, 1 << 20) == b"\x7fELF" * 1000
    _check_links(nodes)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_tar_round_trip(tmp_path, fmt, compress):
    members = sample_members()
    if fmt == tarfile.GNU_FORMAT:  # GNU has no PAX records: no xattrs, whole seconds
        members = [(ti, d) for ti, d in members if ti.name not in ("usr/bin/ping", "usr/bin/ping6",
                                                                    "precise")]
    archive = tmp_path / f"a.tar.{compress or 'plain'}"
    archive.write_bytes(tar_bytes(members, fmt, compress))
    image = tmp_path / "a.img"
    stats = pack(archive, image)
    assert stats.devices == 2 and stats.fifos == 1
    with Image.open(image) as img:
        if fmt == tarfile.PAX_FORMAT:
            _check_sample(img)
        else:
            nodes = _by_path(img)
            assert nodes[b"/dev/null"].rdev == os.makedev(1, 3)
            assert any(p.endswith(b"f" * 200) for p in nodes)
            _check_links(nodes)
    assert verify_image(image).exit_code == 0


def test_tar_from_stdin(tmp_path):
    raw = tar_bytes(sample_members(), compress="zst")
    image = tmp_path / "s.img"
    pack("-", image, stdin=io.BytesIO(raw))
    with Image.open(image) as img:
        _check_sample(img)
    cli_image = tmp_path / "cli.img"
    done = run_incfs_input(["pack", "-", str(cli_image)], tar_bytes(sample_members(), compress="gz"))
    assert done.returncode == 0, done.stderr
    assert b"2 devices" in done.stdout and b"1 fifo" in done.stdout
    with Image.open(cli_image) as img:
        _check_sample(img)


def run_incfs_input(args: list[str], data: bytes) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "incfs.cli", *args], input=data,
                          capture_output=True)


def test_gnu_tar_of_a_real_tree_matches_the_tree(posix_tree, tmp_path):
    """GNU tar (PAX, with xattrs) of the fidelity tree packs to the same
    inodes as the tree itself (sockets excepted: tar cannot hold them)."""
    archive = tmp_path / "tree.tar"
    proc = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "--format=posix",
                           "--numeric-owner", "-C", str(posix_tree), "-cf", str(archive), "."],
                          capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr  # 1: "socket ignored"
    from_dir, from_tar = tmp_path / "dir.img", tmp_path / "tar.img"
    pack(posix_tree, from_dir)
    pack(archive, from_tar)
    with Image.open(from_dir) as a, Image.open(from_tar) as b:
        da = {p: n for p, n in a.ns.walk() if not stat.S_ISSOCK(n.mode)}
        db = _by_path(b)
        assert set(da) == set(db)
        for path, na in da.items():
            nb = db[path]
            assert (na.mode, na.uid, na.gid, na.rdev, na.size, na.target) == \
                (nb.mode, nb.uid, nb.gid, nb.rdev, nb.size, nb.target), path
            if na.is_reg:  # GNU tar archives devices and fifos without their hard links
                assert na.nlink == nb.nlink, path
            assert na.mtime_ns == nb.mtime_ns, path
            # ACLs too: --xattrs-include=* stores them raw as SCHILY.xattr.system.*
            assert dict(na.xattrs) == dict(nb.xattrs), path
            if na.is_reg:
                assert na.root_hash == nb.root_hash, path


def test_gnu_tar_text_acls_become_the_kernels_values(tmp_path):
    """`tar --acls` (without --xattrs) writes ACLs as text; they come back as
    the binary system.posix_acl_* values the source file had."""
    from conftest import ACL
    src = tmp_path / "acl"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"f")
    try:
        os.setxattr(src / "f", "system.posix_acl_access", ACL)
        os.setxattr(src / "sub", "system.posix_acl_default", ACL)
    except OSError as e:
        pytest.skip(f"kernel feature missing: POSIX ACLs on the file system under {tmp_path} "
                    f"(CONFIG_EXT4_FS_POSIX_ACL or the fs's equivalent): {e.strerror}")
    archive = tmp_path / "acl.tar"
    subprocess.run(["tar", "--acls", "--format=posix", "-C", str(src), "-cf", str(archive), "."],
                   check=True)
    image = tmp_path / "acl.img"
    pack(archive, image)
    with Image.open(image) as img:
        nodes = _by_path(img)
        assert dict(nodes[b"/f"].xattrs) == xattrs_of(src / "f")
        assert dict(nodes[b"/sub"].xattrs) == xattrs_of(src / "sub")
        assert nodes[b"/f"].xattrs[b"system.posix_acl_access"] == ACL


def test_text_acl_with_a_name_only_is_noted_not_guessed(tmp_path):
    archive = tmp_path / "named.tar"
    archive.write_bytes(tar_bytes([member("f", data=b"", pax_headers={
        "SCHILY.acl.access": "user::rw-\nuser:bob:r--\ngroup::r--\nmask::r--\nother::---\n"}),
        member("g", data=b"", pax_headers={  # star's form carries the id
            "SCHILY.acl.access": "user::rw-,user:bob:r--:1234,group::r--,mask::r--,other::---"})]))
    stats = pack(archive, tmp_path / "n.img")
    assert any("'bob' has no numeric id" in note for note in stats.skipped)
    with Image.open(tmp_path / "n.img") as img:
        assert not img.ns.lookup(1, b"f").xattrs
        assert img.ns.lookup(1, b"g").xattrs[b"system.posix_acl_access"] == \
            __import__("conftest").ACL


def test_directory_xattrs_match_the_source(posix_tree, tmp_path):
    image = tmp_path / "x.img"
    pack(posix_tree, image)
    with Image.open(image) as img:
        for path, node in img.ns.walk():
            full = Path(os.fsdecode(os.fsencode(posix_tree) + path))
            assert dict(node.xattrs) == xattrs_of(full), path


# --- duplicates and the tree rules --------------------------------------------------

def test_later_entry_wins(tmp_path):
    archive = tmp_path / "dup.tar"
    archive.write_bytes(tar_bytes([
        member("a", data=b"first"),
        member("a", data=b"second", mode=0o600),
        member("d", tarfile.DIRTYPE, mode=0o700),
        member("d/x", data=b"x"),
        member("d", tarfile.DIRTYPE, mode=0o750),  # a directory again: metadata, children kept
        member("e", tarfile.DIRTYPE),
        member("e/y", data=b"y"),
        member("e", data=b"now a file"),  # replaces the directory and what is under it
    ]))
    image = tmp_path / "dup.img"
    pack(archive, image)
    with Image.open(image) as img:
        nodes = _by_path(img)
        assert img.read_range(nodes[b"/a"], 0, 100) == b"second"
        assert nodes[b"/a"].mode == stat.S_IFREG | 0o600
        assert nodes[b"/d"].mode == stat.S_IFDIR | 0o750 and b"/d/x" in nodes
        assert nodes[b"/e"].is_reg and b"/e/y" not in nodes
    assert verify_image(image).exit_code == 0


def test_hard_link_keeps_the_replaced_file(tmp_path):
    archive = tmp_path / "hl.tar"
    archive.write_bytes(tar_bytes([
        member("a", data=b"old"),
        member("b", tarfile.LNKTYPE, linkname="a"),
        member("a", data=b"new"),
    ]))
    image = tmp_path / "hl.img"
    pack(archive, image)
    with Image.open(image) as img:
        nodes = _by_path(img)
        assert img.read_range(nodes[b"/b"], 0, 9) == b"old"
        assert img.read_range(nodes[b"/a"], 0, 9) == b"new"


# --- bad input: one clear error, nothing left behind ---------------------------------

BAD_TARS = {
    "absolute path": ([member("/etc/passwd", data=b"x")], "absolute path"),
    "dot-dot": ([member("a/../../x", data=b"x")], r"leaves the archive"),
    "hard link outside": ([member("a", tarfile.LNKTYPE, linkname="../etc/passwd")],
                          r"leaves the archive"),
    "hard link to a missing entry": ([member("a", tarfile.LNKTYPE, linkname="nope")],
                                     "not an earlier entry"),
    "hard link to a later entry": ([member("a", tarfile.LNKTYPE, linkname="b"),
                                    member("b", data=b"b")], "not an earlier entry"),
    "hard link to a directory": ([member("d", tarfile.DIRTYPE),
                                  member("a", tarfile.LNKTYPE, linkname="d")],
                                 "hard link to a directory"),
    "file under a file": ([member("f", data=b"f"), member("f/g", data=b"g")],
                          "is not a directory"),
    "root is a file": ([member("./", data=b"f")], "root is not a directory"),
    "name too long": ([member("x" * 300, data=b"")], "bad name"),
    "uid beyond 32 bits": ([member("a", data=b"", uid=1 << 40)], "owner id"),
    "mtime out of range": ([member("a", data=b"", pax_headers={"mtime": "1" + "0" * 30})],
                           "modification time"),
    "symlink target too long": ([member("l", tarfile.SYMTYPE, linkname="t" * 5000)],
                                "longer than 4095"),
    "reserved xattr": ([member("a", data=b"", pax_headers={"SCHILY.xattr.user.incfs.x": "1"})],
                       "reserved for incfs"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_tar_is_refused(tmp_path, case):
    members, message = BAD_TARS[case]
    out = tmp_path / "out"
    out.mkdir()
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_bytes(members))
    with pytest.raises(UsageError, match=message):
        pack(archive, out / "bad.img")
    assert list(out.iterdir()) == []


def test_device_number_beyond_dev_t_is_refused(tmp_path):
    archive = tmp_path / "dev.tar"  # GNU headers store big numbers in base 256
    archive.write_bytes(tar_bytes([member("d", tarfile.CHRTYPE, devmajor=1 << 40, devminor=0)],
                                  tarfile.GNU_FORMAT))
    with pytest.raises(UsageError, match="device number"):
        pack(archive, tmp_path / "dev.img")


def test_bad_tar_from_the_cli_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_incfs_input(["pack", "-", str(out / "x.img")],
                           tar_bytes([member("../x", data=b"x")]))
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "leaves the archive" in lines[0]
    assert b"Traceback" not in proc.stderr and list(out.iterdir()) == []


@pytest.mark.parametrize("cut", ["data", "header", "marker", "gzip"])
def test_truncated_tar_is_refused(tmp_path, cut):
    raw = tar_bytes([member("a", data=os.urandom(5000)), member("b", data=os.urandom(5000))])
    body_end = 512 + 5120 + 512 + 5120  # both members, before the end-of-archive blocks
    if cut == "data":
        raw = raw[:512 + 3000]
    elif cut == "header":
        raw = raw[:512 + 5120 + 200]
    elif cut == "marker":
        raw = raw[:body_end]
    else:
        raw = gzip.compress(raw)[:-300]
    archive = tmp_path / "cut.tar"
    archive.write_bytes(raw)
    with pytest.raises(UsageError, match="truncated|cut short|end of data|damaged"):
        pack(archive, tmp_path / "cut.img")
    assert not (tmp_path / "cut.img").exists()


def test_garbage_is_not_a_tar(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(UsageError, match="not a directory or a tar archive"):
        pack(junk, tmp_path / "j.img")
    zjunk = tmp_path / "zjunk"
    zjunk.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(4096))
    with pytest.raises(UsageError):
        pack(zjunk, tmp_path / "z.img")


def test_zero_length_entry_bomb_is_bounded(tmp_path):
    """Tens of thousands of empty entries compress to almost nothing; the
    entry limit refuses the archive before memory grows with it."""
    members = [member(f"f{i}") for i in range(20000)]
    archive = tmp_path / "bomb.tar.zst"
    archive.write_bytes(tar_bytes(members, tarfile.USTAR_FORMAT, "zst"))
    assert archive.stat().st_size < 200_000
    with pytest.raises(UsageError, match="more than 5000 entries"):
        pack(archive, tmp_path / "bomb.img", max_entries=5000)
    proc = run_incfs_input(["pack", str(archive), str(tmp_path / "b2.img"), "--max-entries",
                            "100"], b"")
    assert proc.returncode == 2 and b"more than 100 entries" in proc.stderr
    # the same archive under the default limit is fine: 20,000 empty files
    stats = pack(archive, tmp_path / "ok.img")
    assert stats.files == 20000


def _raw_header(name: str, kind: bytes, data: bytes, size: int | None = None) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if size is None else size
    return ti.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


def test_extended_header_chain_is_bounded(tmp_path):
    """tarfile follows consecutive PAX headers by recursion: thousands of
    them must be one clear error, not a RecursionError."""
    raw = b"".join(_raw_header("././@PaxHeader", tarfile.XHDTYPE, b"11 path=ab\n")
                   for _ in range(5000))
    raw += _raw_header("a", tarfile.REGTYPE, b"x") + bytes(1024)
    with pytest.raises(UsageError, match="extended headers in a row"):
        pack("-", tmp_path / "x.img", stdin=io.BytesIO(raw))
    # the same after a first, ordinary member
    with pytest.raises(UsageError, match="extended headers in a row"):
        pack("-", tmp_path / "x.img", stdin=io.BytesIO(_raw_header("b", tarfile.REGTYPE, b"")
                                                        + raw))


def test_gigantic_long_name_is_refused_without_reading_it(tmp_path):
    """A GNU long name claiming a gigabyte (a few kilobytes compressed) is
    refused before tarfile buffers it."""
    z = zstandard.ZstdCompressor().compressobj()
    out = z.compress(_raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, b"", 1 << 30))
    zeros = bytes(1 << 20)
    for _ in range(1024):
        out += z.compress(zeros)
    out += z.flush()
    assert len(out) < 100_000
    with pytest.raises(UsageError, match="extended header of 1073741824 bytes"):
        pack("-", tmp_path / "x.img", stdin=io.BytesIO(out))


def test_unsupported_member_type_is_skipped_and_reported(tmp_path):
    archive = tmp_path / "v.tar"
    archive.write_bytes(tar_bytes([member("label", b"V"),
                                   member("a", data=b"a")], tarfile.GNU_FORMAT))
    stats = pack(archive, tmp_path / "v.img")
    assert stats.files == 1 and stats.skipped and "'V'" in stats.skipped[0]


# --- OCI image layouts ---------------------------------------------------------------

class OciLayout:
    """Writes an OCI image layout: blobs by digest, a manifest, an index."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.manifests: list[dict] = []

    def blob(self, data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    def image(self, layers: list[bytes], tag: str | None = "latest",
              compress: str = "gz") -> list[dict]:
        media = {"": "application/vnd.oci.image.layer.v1.tar",
                 "gz": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "zst": "application/vnd.oci.image.layer.v1.tar+zstd"}[compress]
        descs = [dict(self.blob(layer), mediaType=media) for layer in layers]
        config = dict(self.blob(b'{"architecture": "amd64", "os": "linux"}'),
                      mediaType="application/vnd.oci.image.config.v1+json")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config, "layers": descs}
        desc = dict(self.blob(json.dumps(manifest).encode()),
                    mediaType="application/vnd.oci.image.manifest.v1+json")
        if tag:
            desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.manifests.append(desc)
        (self.root / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "manifests": self.manifests}))
        return descs


def _layers(compress="gz"):
    base = tar_bytes([
        member("etc", tarfile.DIRTYPE),
        member("etc/os-release", data=b"base\n"),
        member("etc/gone", data=b"deleted later\n" * 1000),
        member("opt", tarfile.DIRTYPE),
        member("opt/old1", data=b"1"),
        member("opt/sub", tarfile.DIRTYPE),
        member("opt/sub/old2", data=b"2"),
        member("usr/bin/tool", data=b"v1"),
        member("usr/bin/tool-link", tarfile.LNKTYPE, linkname="usr/bin/tool"),
        member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
    ], compress=compress)
    upper = tar_bytes([
        member("etc/.wh.gone"),
        member("opt/new", data=b"new"),
        member("opt/.wh..wh..opq"),  # after a sibling of the same layer: that one stays
        member("usr/bin/tool", data=b"v2", mode=0o4755),
        member("etc/.wh.never-was"),
    ], compress=compress)
    return [base, upper]


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_oci_layers_apply_in_order(tmp_path, compress):
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers(compress), compress=compress)
    image = tmp_path / "oci.img"
    stats = pack(f"oci:{layout.root}:latest", image)
    assert any("never-was" in note for note in stats.skipped)
    with Image.open(image) as img:
        nodes = _by_path(img)
        assert b"/etc/gone" not in nodes and b"/etc/os-release" in nodes
        assert b"/opt/old1" not in nodes and b"/opt/sub" not in nodes
        assert img.read_range(nodes[b"/opt/new"], 0, 9) == b"new"
        tool = nodes[b"/usr/bin/tool"]
        assert img.read_range(tool, 0, 9) == b"v2" and tool.mode == stat.S_IFREG | 0o4755
        # the hard link made in the lower layer keeps the lower file
        assert img.read_range(nodes[b"/usr/bin/tool-link"], 0, 9) == b"v1"
        assert nodes[b"/dev/null"].rdev == os.makedev(1, 3)
    # the deleted file's data was never stored
    assert image.stat().st_size < 64 * 1024
    assert verify_image(image).exit_code == 0


def test_oci_without_a_tag_takes_the_only_image(tmp_path):
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers(), tag=None)
    pack(f"oci:{layout.root}", tmp_path / "a.img")
    layout.image(_layers(), tag="second")
    with pytest.raises(UsageError, match="2 images .* oci:DIR:TAG"):
        pack(f"oci:{layout.root}", tmp_path / "b.img")
    with pytest.raises(UsageError, match="no image tagged 'nope'"):
        pack(f"oci:{layout.root}:nope", tmp_path / "c.img")


def test_oci_layer_digest_mismatch_is_refused(tmp_path):
    layout = OciLayout(tmp_path / "oci")
    descs = layout.image(_layers())
    blob = layout.root / "blobs" / "sha256" / descs[1]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # gzip's trailer: the tar inside may still read, the digest does not match
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="layer 1 .*digest|damaged"):
        pack(f"oci:{layout.root}:latest", out / "x.img")
    assert list(out.iterdir()) == []


def test_oci_replaced_layer_is_refused(tmp_path):
    """A well-formed layer that is not the one the manifest names."""
    layout = OciLayout(tmp_path / "oci")
    descs = layout.image(_layers())
    blob = layout.root / "blobs" / "sha256" / descs[0]["digest"].split(":")[1]
    other = tar_bytes([member("evil", data=b"x")], compress="gz")
    blob.write_bytes(other.ljust(descs[0]["size"], b"\0")[:descs[0]["size"]])
    with pytest.raises(UsageError, match="layer 0 .*does not match its digest"):
        pack(f"oci:{layout.root}:latest", tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize("bad, message", [
    ([member("../escape", data=b"x")], "leaves the archive"),
    ([member("/etc/evil", data=b"x")], "absolute path"),
    ([member("a", tarfile.LNKTYPE, linkname="../../etc/passwd")], "leaves the archive"),
], ids=["dot-dot", "absolute", "hard link outside"])
def test_oci_layer_with_a_bad_entry_is_refused(tmp_path, bad, message):
    """A layer's entries obey the tar rules; the error names the layer."""
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers()[:1] + [tar_bytes(bad)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match=f"layer 1 .*{message}"):
        pack(f"oci:{layout.root}:latest", out / "x.img")
    assert list(out.iterdir()) == []


def test_oci_whiteouts_of_dot_names_hide_nothing(tmp_path):
    """`.wh...`, `.wh..` and a bare `.wh.` name no entry: each is ignored
    and noted, and never removes the directory it sits in or its parent."""
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers()[:1] + [tar_bytes([member("etc/.wh..."), member("etc/.wh.."),
                                             member("etc/.wh.")])])
    stats = pack(f"oci:{layout.root}:latest", tmp_path / "x.img")
    assert len([n for n in stats.skipped if "which no lower layer has" in n]) == 3
    with Image.open(tmp_path / "x.img") as img:
        nodes = _by_path(img)
        assert {b"/etc", b"/etc/os-release", b"/etc/gone", b"/usr/bin/tool"} <= set(nodes)


def _nested_index(layout: OciLayout, platforms: dict[str, list[bytes]],
                  docker: bool = False) -> None:
    """index.json -> an image index (or Docker manifest list) with one
    manifest per architecture, as `skopeo copy --all` writes it; with
    `docker`, Docker's media types throughout (a `docker save` converted)."""
    kind = "application/vnd.docker" if docker else "application/vnd.oci"
    layer_type = ("application/vnd.docker.image.rootfs.diff.tar.gzip" if docker
                  else "application/vnd.oci.image.layer.v1.tar+gzip")
    manifest_type = (f"{kind}.distribution.manifest.v2+json" if docker
                     else f"{kind}.image.manifest.v1+json")
    entries = []
    for arch, layers in platforms.items():
        config = layout.blob(json.dumps({"architecture": arch, "os": "linux"}).encode())
        manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                    "config": dict(config, mediaType=f"{kind}.container.image.v1+json"),
                    "layers": [dict(layout.blob(gzip.compress(raw)), mediaType=layer_type)
                               for raw in layers]}
        entries.append(dict(layout.blob(json.dumps(manifest).encode()), mediaType=manifest_type,
                            platform={"architecture": arch, "os": "linux"}))
    list_type = (f"{kind}.distribution.manifest.list.v2+json" if docker
                 else f"{kind}.image.index.v1+json")
    inner = layout.blob(json.dumps({"schemaVersion": 2, "mediaType": list_type,
                                    "manifests": entries}).encode())
    (layout.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        dict(inner, mediaType=list_type,
             annotations={"org.opencontainers.image.ref.name": "multi"})]}))


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_oci_image_index_picks_this_machines_architecture(tmp_path, docker):
    from incfs.inputs.oci import _ARCH
    import platform
    ours = _ARCH.get(platform.machine(), platform.machine())
    other = "s390x" if ours != "s390x" else "arm64"
    layout = OciLayout(tmp_path / "oci")
    _nested_index(layout, {other: [tar_bytes([member("arch", data=other.encode())])],
                           ours: [tar_bytes([member("arch", data=ours.encode())])]}, docker)
    pack(f"oci:{layout.root}:multi", tmp_path / "x.img")
    with Image.open(tmp_path / "x.img") as img:
        assert img.read_range(img.ns.lookup(1, b"arch"), 0, 99) == ours.encode()
    layout = OciLayout(tmp_path / "oci-other")
    _nested_index(layout, {other: [tar_bytes([member("a")])], "mips": [tar_bytes([])]}, docker)
    with pytest.raises(UsageError, match=f"no manifest for linux/{ours}"):
        pack(f"oci:{layout.root}:multi", tmp_path / "y.img")
    # one manifest, for another machine: packed as it is, and pack says so
    layout = OciLayout(tmp_path / "oci-one")
    _nested_index(layout, {other: [tar_bytes([member("arch", data=other.encode())])]}, docker)
    stats = pack(f"oci:{layout.root}:multi", tmp_path / "z.img")
    assert any(f"only manifest is for linux/{other}, not this machine's linux/{ours}" in n
               for n in stats.skipped), stats.skipped
    with Image.open(tmp_path / "z.img") as img:
        assert img.read_range(img.ns.lookup(1, b"arch"), 0, 99) == other.encode()


def test_oci_descriptor_fields_of_the_wrong_json_type_are_usage_errors(tmp_path):
    """annotations or platform that are not objects match no tag or
    platform: a clear error, not an internal one."""
    layout = OciLayout(tmp_path / "oci")
    _nested_index(layout, {"s390x": [tar_bytes([])], "arm64": [tar_bytes([])]})
    outer = json.loads((layout.root / "index.json").read_text())
    inner_path = layout.root / "blobs" / "sha256" / outer["manifests"][0]["digest"][7:]
    inner = json.loads(inner_path.read_bytes())
    for entry in inner["manifests"]:
        entry["platform"] = "linux"
    outer["manifests"][0].update(layout.blob(json.dumps(inner).encode()), annotations=["multi"])
    (layout.root / "index.json").write_text(json.dumps(outer))
    with pytest.raises(UsageError, match="no image tagged 'multi'"):
        pack(f"oci:{layout.root}:multi", tmp_path / "x.img")
    with pytest.raises(UsageError, match="no manifest for linux/"):
        pack(f"oci:{layout.root}", tmp_path / "x.img")


def test_oci_bad_layouts(tmp_path):
    with pytest.raises(UsageError, match="not an OCI image layout"):
        pack(f"oci:{tmp_path}", tmp_path / "x.img")
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers())
    index = json.loads((layout.root / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (layout.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="bad digest"):
        pack(f"oci:{layout.root}", tmp_path / "y.img")
    (layout.root / "index.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        pack(f"oci:{layout.root}", tmp_path / "z.img")


def test_oci_from_the_cli(tmp_path):
    layout = OciLayout(tmp_path / "oci")
    layout.image(_layers(), tag="v1")
    proc = run_incfs("pack", f"oci:{layout.root}:v1", tmp_path / "cli.img")
    assert proc.returncode == 0, proc.stderr
    assert "Skipped or ignored 1 entry" in proc.stdout


def test_open_input_names_what_it_accepts(tmp_path):
    with pytest.raises(UsageError, match="not a directory, a tar archive, '-' or oci:"):
        open_input(tmp_path / "missing")


# --- any damage: UsageError or a good image, never anything else -------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEED_TAR = tar_bytes(sample_members()[:12])
_SEED_GZ = gzip.compress(_SEED_TAR)


@settings(max_examples=int(os.environ.get("INCFS_TAR_FUZZ", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from([_SEED_TAR, _SEED_GZ]),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       cut=st.none() | st.integers(0, 1 << 20))
def test_damaged_tar_gives_usage_error_or_a_good_image(tmp_path_factory, seed, edits, cut):
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    out = tmp_path_factory.mktemp("fuzz")
    try:
        pack("-", out / "x.img", stdin=io.BytesIO(bytes(data)), max_entries=1000)
    except UsageError as e:
        assert "\n" not in str(e)
        assert list(out.iterdir()) == []
        return
    assert verify_image(out / "x.img").exit_code == 0
