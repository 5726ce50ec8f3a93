"""The mount commands as a user types them: serve, mount (http, signed),
status, profile record, handoff-free umount; and their one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

INCFS = [sys.executable, "-m", "incfs.cli"]


def incfs(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(INCFS + [os.fspath(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_image(tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool.sh").write_text("#!/bin/sh\necho tool says hi\n")
    (src / "bin" / "tool.sh").chmod(0o755)
    (src / "data.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    incfs("keygen", tmp_path / "k", "--algorithm", "ecdsa-p256")
    incfs("pack", src, tmp_path / "app.img", "--sign-key", tmp_path / "k")
    port = _free_port()
    server = subprocess.Popen(INCFS + ["serve", str(tmp_path / "app.img"), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield src, f"http://127.0.0.1:{port}/app.img", tmp_path
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_mount_http_status_profile_umount(served_image):
    src, url, tmp = served_image
    mnt = tmp / "mnt"
    mnt.mkdir()
    incfs("mount", url, mnt, "--cache", tmp / "cache.img", "--key", tmp / "k.pub",
          "--prefetch", "none")
    try:
        run = subprocess.run([str(mnt / "bin" / "tool.sh")], capture_output=True, text=True)
        assert run.stdout == "tool says hi\n"
        with open(mnt / "data.bin", "rb") as f:
            assert f.read(4096) == (src / "data.bin").read_bytes()[:4096]
        status = json.loads(incfs("status", mnt, "--json").stdout)
        for key in ("files", "blocks_total", "blocks_present", "bytes_fetched",
                    "pending_reads", "complete"):
            assert key in status
        assert status["files"] == 2 and status["signed"] is True
        assert 0 < status["blocks_present"] < status["blocks_total"]
        # the command opened the source's connections before forking the
        # daemon (incfs.preconnect), and the daemon got them: the first
        # carried the metadata (read without the client, incfs.loader.early),
        # the others the first reads (incfs.loader.ondemand), then the
        # loader's source has them all (the first came back once the rest of
        # its answer was read, incfs.loader.tail)
        from incfs.loader.config import DEFAULTS

        source = status["loader"]["sources"][0]
        assert source["early_connections"] == DEFAULTS.warm_connections
        assert source["early_requests"] >= 1 and source["errors"] == 0
        if os.geteuid() == 0:  # the readahead window is root's to set
            from incfs.mount import READAHEAD_LOADING_KB

            dev = os.stat(mnt).st_dev
            bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
            assert int(bdi.read_text()) == READAHEAD_LOADING_KB  # still loading: 1 MiB
        assert "blocks" in incfs("status", mnt).stdout
        incfs("profile", "record", mnt, tmp / "p.json")
        profile = json.loads((tmp / "p.json").read_text())
        assert ["bin/tool.sh", 0] in [[p.lstrip("/"), i] for p, i in profile["blocks"]]
    finally:
        incfs("umount", mnt)
    assert not os.path.ismount(mnt)


def test_mount_errors_are_one_line(served_image, tmp_path):
    _src, url, tmp = served_image
    mnt = tmp / "mnt2"
    mnt.mkdir()
    unsigned = incfs("mount", str(tmp / "app.img"), mnt, check=False)
    assert unsigned.returncode != 0 and len(unsigned.stderr.strip().splitlines()) == 1
    assert "--key" in unsigned.stderr and not os.path.ismount(mnt)
    wrong = incfs("keygen", tmp / "other")
    assert wrong.returncode == 0
    bad_key = incfs("mount", url, mnt, "--cache", tmp / "c2.img", "--key", tmp / "other.pub",
                    check=False)
    assert bad_key.returncode == 1 and "different key" in bad_key.stderr
    assert not os.path.ismount(mnt)
    for args in (["--read-timeout", "-3"], ["--prefetch", "sometimes"]):
        proc = incfs("mount", url, mnt, *args, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert incfs("umount", mnt, check=False).returncode == 2
    assert incfs("status", mnt, check=False).returncode == 2
