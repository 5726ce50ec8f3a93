"""A normal user (issue 12, item 3): a real account made with useradd, a venv
it can run (tests/unprivileged.py says why the project's own venv is out of
its reach), and real mounts through fusermount3."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from incfs import kmount
from mounting import force_unmount
from unprivileged import dev_fuse_mode, normal_user  # noqa: F401  (fixture)


@pytest.fixture
def workdir(normal_user):
    path = Path(tempfile.mkdtemp(prefix="incfs-user-", dir=normal_user.home))
    os.chown(path, normal_user.uid, normal_user.gid)
    try:
        yield path
    finally:
        for mnt in path.glob("mnt*"):
            if kmount.mount_at(mnt) is not None:
                force_unmount(mnt, grace=2.0)
        shutil.rmtree(path, ignore_errors=True)


def _tree(user, root: Path) -> Path:
    user.run("mkdir", "-p", root / "sub")
    user.run("sh", "-c", f"echo 'hello from a normal user' > {root}/sub/hello.txt")
    user.run("dd", "if=/dev/urandom", f"of={root}/data.bin", "bs=64k", "count=20")
    return root


def test_normal_user_runs_help_and_pack(normal_user, workdir):
    help_text = normal_user.run("incfs", "--help").stdout
    assert "pack" in help_text and "mount" in help_text
    assert normal_user.run("id", "-u").stdout.strip() == str(normal_user.uid) != "0"
    src = _tree(normal_user, workdir / "src")
    normal_user.run("incfs", "keygen", workdir / "k")
    packed = normal_user.run("incfs", "pack", src, workdir / "a.img", "--sign-key", workdir / "k")
    assert "Packed 2 files" in packed.stdout, packed.stdout
    assert os.stat(workdir / "a.img").st_uid == normal_user.uid
    normal_user.run("incfs", "verify", workdir / "a.img", "--key", workdir / "k.pub")


@pytest.mark.parametrize("mode", [0o666], ids=["dev-fuse-0666"])
def test_normal_user_mounts_reads_status_umounts(normal_user, workdir, mode):
    src = _tree(normal_user, workdir / "src")
    normal_user.run("incfs", "pack", src, workdir / "a.img")
    mnt = workdir / "mnt"
    normal_user.run("mkdir", mnt)
    with dev_fuse_mode(mode):
        mounted = normal_user.run("incfs", "mount", workdir / "a.img", mnt, "--allow-unsigned",
                                  check=False)
        assert mounted.returncode == 0, mounted.stderr
        assert normal_user.run("cat", mnt / "sub" / "hello.txt").stdout == \
            "hello from a normal user\n"
        assert normal_user.run("cmp", mnt / "data.bin", src / "data.bin").returncode == 0
        status = json.loads(normal_user.run("incfs", "status", mnt, "--json").stdout)
        assert status["files"] == 2 and status["complete"]
        assert int(status["pid"]) > 0
        assert os.stat(f"/proc/{status['pid']}").st_uid == normal_user.uid
        normal_user.run("incfs", "umount", mnt)
        assert kmount.mount_at(mnt) is None
        # the runtime directory (under /tmp without XDG_RUNTIME_DIR) is gone too
        key = hashlib.sha256(os.path.realpath(mnt).encode()).hexdigest()[:16]
        assert not (Path(f"/tmp/incfs-{normal_user.uid}") / key).exists()


def _owners_in(user, mnt: Path) -> dict[str, tuple[int, int]]:
    """(uid, gid) of each entry as the user's own `stat` sees it."""
    out = user.run("find", mnt, "-mindepth", "1", "-printf", r"%P %U %G\n").stdout
    return {path: (int(uid), int(gid)) for path, uid, gid in
            (line.split() for line in out.splitlines())}


def test_normal_users_mount_maps_owners_unless_told_otherwise(normal_user, workdir):
    """An image root packed with other owners: the user's mount shows every
    entry as the user's (auto), or as stored with --owners stored."""
    src = workdir / "owned"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "shadow").write_bytes(b"root:*:19000::::::\n")
    (src / "home").mkdir()
    os.symlink("../etc/shadow", src / "home" / "link")
    stored = {"etc": (0, 0), "etc/shadow": (0, 42), "home": (1000, 1000),
              "home/link": (5, 6)}
    for rel, (uid, gid) in stored.items():
        os.lchown(src / rel, uid, gid)
    image = workdir / "owned.img"
    subprocess.run([sys.executable, "-m", "incfs.cli", "pack", str(src), str(image)],
                   check=True, capture_output=True)
    os.chown(image, normal_user.uid, normal_user.gid)
    mine = (normal_user.uid, normal_user.gid)
    for option, want in (([], {rel: mine for rel in stored}), (["--owners", "stored"], stored)):
        mnt = normal_user.make_dir(workdir / f"mnt{len(option)}")
        with dev_fuse_mode(0o666):
            normal_user.run("incfs", "mount", image, mnt, "--allow-unsigned", *option)
            try:
                assert _owners_in(normal_user, mnt) == want, option
            finally:
                normal_user.run("incfs", "umount", mnt)


# each listed name and what reading it gives: the value, or the errno's name
_LIST_AND_READ = """
import errno, json, os, sys
def read(path, name):
    try:
        return os.getxattr(path, name, follow_symlinks=False).hex()
    except OSError as e:
        return errno.errorcode[e.errno]
print(json.dumps({p: {n: read(p, n) for n in os.listxattr(p, follow_symlinks=False)}
                  for p in sys.argv[1:]}))
"""


def test_trusted_xattrs_are_listed_to_admins_only(normal_user, workdir, posix_tree):
    """As on ext4: on root's mount (allow_other) a normal user is not shown
    trusted.* names, which the kernel would not let it read (ENODATA), so
    no listed name reads as missing. Root is shown them all."""
    from conftest import xattrs_of
    from mounting import mounted
    image = workdir / "posix.img"
    subprocess.run([sys.executable, "-m", "incfs.cli", "pack", str(posix_tree), str(image)],
                   check=True, capture_output=True)
    with mounted(workdir, str(image), name="mnt-root", allow_unsigned=True) as m:
        paths = [m.path / "doc.txt", m.path / "link", m.path / "bin" / "ping"]
        seen = json.loads(normal_user.run("python", "-c", _LIST_AND_READ, *paths).stdout)
        for path in paths:
            stored = xattrs_of(posix_tree / path.relative_to(m.path))
            assert xattrs_of(path) == stored  # root: all of them
            shown = seen[str(path)]
            assert set(shown) == {os.fsdecode(n) for n in stored
                                  if not n.startswith(b"trusted.")}, path
            assert "ENODATA" not in shown.values(), (path, shown)
            # readable ones come back as stored (doc.txt's ACL gives others
            # no read: EACCES, as on the tree)
            assert all(v == stored[os.fsencode(n)].hex() for n, v in shown.items()
                       if v != "EACCES"), path
        assert seen[str(paths[2])]["security.capability"] == \
            xattrs_of(paths[2])[b"security.capability"].hex()
        assert any(n.startswith(b"trusted.") for n in xattrs_of(paths[0]))


def test_normal_user_at_0600_gets_a_clear_error(normal_user, workdir):
    """/dev/fuse at 0600 (root only): incfs calls fusermount3 itself, but
    fusermount3 opens /dev/fuse with the user's fsuid, so the machine's
    policy says no. The mount fails with one clear line and leaves nothing."""
    src = _tree(normal_user, workdir / "src")
    normal_user.run("incfs", "pack", src, workdir / "a.img")
    mnt = workdir / "mnt"
    normal_user.run("mkdir", mnt)
    with dev_fuse_mode(0o600):
        done = normal_user.run("incfs", "mount", workdir / "a.img", mnt, "--allow-unsigned",
                               check=False)
    assert done.returncode == 2, done.stderr
    assert "fusermount3 could not mount" in done.stderr and "/dev/fuse" in done.stderr
    assert kmount.mount_at(mnt) is None


def test_normal_user_cache_defaults_to_xdg_cache(normal_user, workdir):
    """An empty mount without --cache keeps its backing image under
    ~/.cache/incfs of the user (with /dev/fuse at 0666, the only mode a
    normal user can mount with here)."""
    mnt = workdir / "mnt"
    normal_user.run("mkdir", mnt)
    cache_dir = normal_user.home / ".cache" / "incfs"
    before = set(cache_dir.glob("*.img")) if cache_dir.exists() else set()
    with dev_fuse_mode(0o666):
        normal_user.run("incfs", "mount", "empty", mnt)
        try:
            made = set(cache_dir.glob("*.img")) - before
            assert len(made) == 1 and next(iter(made)).stat().st_uid == normal_user.uid
        finally:
            normal_user.run("incfs", "umount", mnt)
    for path in made:
        path.unlink()


FUSERMOUNT_PROBE = """
import os, socket, subprocess, sys
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
done = subprocess.run(["fusermount3", "-o", "ro,fsname=probe", "--", sys.argv[1]],
                      env={"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/bin:/bin"},
                      pass_fds=[theirs.fileno()], capture_output=True, text=True)
print(done.returncode, done.stderr.strip())
"""


@pytest.mark.parametrize("mode", [0o600, 0o666], ids=["dev-fuse-0600", "dev-fuse-0666"])
def test_fusermount3_opens_dev_fuse_as_the_user(normal_user, workdir, mode):
    """The fact a FUSE layer for normal users has to live with: fusermount3
    (setuid root, 3.14) opens /dev/fuse with the calling user's fsuid, so at
    0600 it fails however it is called (the _FUSE_COMMFD protocol here)."""
    mnt = workdir / "mnt-probe"
    normal_user.run("mkdir", mnt)
    with dev_fuse_mode(mode):
        out = normal_user.run("python", "-c", FUSERMOUNT_PROBE, mnt).stdout.strip()
        try:
            if mode == 0o600:
                assert out == "1 fusermount3: failed to open /dev/fuse: Permission denied"
            else:
                assert out.startswith("0"), out
                assert kmount.mount_at(mnt).source == "probe"
        finally:
            if kmount.mount_at(mnt) is not None:
                normal_user.run("fusermount3", "-u", mnt)
