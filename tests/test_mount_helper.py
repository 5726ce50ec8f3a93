"""Linux conventions (issue 12, item 2): `mount -t incfs`, fstab lines (through
`mount -T` with a private fstab) and `umount` on real mounts, through the
mount.incfs and umount.fuse.incfs helpers installed in /usr/sbin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from incfs import kmount
from incfs.mount_helper import HELPERS, helper_script, install, options_to_args, split_options
from incfs.pack import pack
from incfs.procs import process_alive
from mounting import daemon_pid, force_unmount, wait_gone

SBIN = "/usr/sbin"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) helpers run as root")


@pytest.fixture(scope="module")
def helpers():
    """The helpers, written for this interpreter (and, through PYTHONPATH,
    this checkout's code); whatever was there before is put back after."""
    before = {}
    for name in HELPERS:
        path = Path(SBIN) / name
        before[path] = path.read_text() if path.exists() else None
    install(SBIN, sys.executable)
    try:
        yield
    finally:
        for path, text in before.items():
            if text is None:
                path.unlink(missing_ok=True)
            elif path.read_text() != text:
                path.write_text(text)


@pytest.fixture
def signed(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "hello.sh").write_text("#!/bin/sh\necho hello from incfs\n")
    (src / "bin" / "hello.sh").chmod(0o755)
    (src / "data.bin").write_bytes(os.urandom(1024 * 1024 + 3))
    run(sys.executable, "-m", "incfs.cli", "keygen", tmp_path / "k")
    run(sys.executable, "-m", "incfs.cli", "pack", src, tmp_path / "app.img",
        "--sign-key", tmp_path / "k")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield src, tmp_path / "app.img", tmp_path / "k.pub", mnt
    finally:
        if kmount.mount_at(mnt) is not None:
            force_unmount(mnt, grace=2.0)


def run(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def test_mount_t_incfs_read_umount(helpers, signed):
    src, image, pub, mnt = signed
    run("mount", "-t", "incfs", image, mnt,
        "-o", f"key={pub},read_timeout=30,noauto,_netdev,nofail,rw")
    entry = kmount.mount_at(mnt)
    assert entry is not None and entry.fstype == "fuse.incfs"
    assert (mnt / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    assert run(mnt / "bin" / "hello.sh").stdout == "hello from incfs\n"
    assert run(sys.executable, "-m", "incfs.cli", "status", mnt, "--json").returncode == 0
    pid = daemon_pid(mnt)
    assert pid and process_alive(pid)
    run("umount", mnt)
    # _netdev is a user-space option: mount(8) keeps it in /run/mount/utab, so
    # umount(8) knows the type is fuse.incfs and runs umount.fuse.incfs,
    # which waits until the daemon has flushed and exited
    assert not process_alive(pid)
    assert kmount.mount_at(mnt) is None


def test_fstab_line(helpers, signed, tmp_path):
    src, image, pub, mnt = signed
    cache = tmp_path / "cache" / "app.img"
    cache.parent.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text("# a private fstab for mount -T\n"
                     f"{image} {mnt} incfs key={pub},cache={cache},read_timeout=forever,"
                     "prefetch=none,noauto,nofail,x-systemd.automount 0 0\n")
    run("mount", "-T", fstab, mnt)
    assert kmount.mount_at(mnt).fstype == "fuse.incfs"
    assert (mnt / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    assert cache.exists()  # the cache= option reached the daemon
    run("umount", mnt)
    assert kmount.mount_at(mnt) is None


def test_umount_without_userspace_options_ends_the_daemon(helpers, signed):
    """With no user-space option (_netdev, x-*, uhelper=) mount(8) writes no
    utab entry, umount(8) then sees type "fuse" through statfs and calls
    umount2 itself: the kernel ends the FUSE connection and the daemon exits
    by itself (every acknowledged fill is already on disk)."""
    src, image, pub, mnt = signed
    run("mount", "-t", "incfs", image, mnt, "-o", f"key={pub}")
    pid = daemon_pid(mnt)
    assert (mnt / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    run("umount", mnt)
    assert kmount.mount_at(mnt) is None
    assert wait_gone(pid, 30)


def test_lazy_umount_through_helper(helpers, signed):
    src, image, pub, mnt = signed
    run("mount", "-t", "incfs", image, mnt, "-o", f"key={pub}")
    pid = daemon_pid(mnt)
    held = open(mnt / "data.bin", "rb")
    try:
        run("umount", "-l", mnt)
        assert kmount.mount_at(mnt) is None
        assert held.read() == (src / "data.bin").read_bytes()  # still served
    finally:
        held.close()
    assert wait_gone(pid, 30)


def test_mount_failures_exit_as_mount_expects(helpers, signed):
    src, image, pub, mnt = signed
    unsigned = run("mount", "-t", "incfs", image, mnt, "-o", "read_timeout=5", check=False)
    assert unsigned.returncode == 32 and "--key" in unsigned.stderr
    bad = run("mount", "-t", "incfs", image, mnt, "-o", f"key={pub},colour=blue", check=False)
    assert bad.returncode == 1 and "unknown option 'colour'" in bad.stderr
    sloppy = run("mount", "-s", "-t", "incfs", image, mnt, "-o", f"key={pub},colour=blue",
                 check=False)
    assert sloppy.returncode == 0, sloppy.stderr
    run("umount", mnt)
    assert kmount.mount_at(mnt) is None


def test_findmnt_shows_the_source(helpers, signed):
    src, image, pub, mnt = signed
    run("mount", "-t", "incfs", image, mnt, "-o", f"key={pub}")
    try:
        shown = run("findmnt", "-n", "-o", "SOURCE", mnt).stdout.strip()
        assert shown == str(image)
    finally:
        run("umount", mnt)


def test_options_map_onto_incfs_mount():
    assert options_to_args(split_options(
        'key=/k.pub,cache=/c.img,read-timeout=30,allow_unsigned,ro,defaults,_netdev,'
        'x-systemd.requires=network-online.target,mirror="http://a/x,y",mirror=http://b/x,'
        'allow_unsigned=no,uhelper=incfs,comment=x-y')) == [
        "--key", "/k.pub", "--cache", "/c.img", "--read-timeout", "30", "--allow-unsigned",
        "--mirror", "http://a/x,y", "--mirror", "http://b/x"]
    for bad in ("foreground", "read_timeout", "key=", "allow_unsigned=maybe"):
        with pytest.raises(Exception):
            options_to_args([bad])


def test_helper_scripts_run_the_given_python():
    text = helper_script("mount", "/opt/incfs venv/bin/python")
    assert text.startswith("#!/bin/sh\n")
    assert "exec '/opt/incfs venv/bin/python' -m incfs.mount_helper mount \"$@\"" in text


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing")
def test_systemd_units_verify(tmp_path):
    """The unit template (as `make install-systemd` fills it in) and the
    example .mount unit pass systemd-analyze verify."""
    repo = Path(__file__).resolve().parent.parent / "systemd"
    text = (repo / "incfs@.service").read_text().replace("@INCFS@", sys.executable)
    assert "KillMode=process" in text and "SendSIGKILL=no" in text
    (tmp_path / "incfs@srv-app.service").write_text(text)
    (tmp_path / "srv-app.mount").write_text((repo / "srv-app.mount.example").read_text())
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           tmp_path / "incfs@srv-app.service", tmp_path / "srv-app.mount"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
