"""incfs.early_fork: a cold `incfs mount` forks its mount's process before
it parses; that child imports, then runs the orders `mount_background`
gives it (or goes when the command ends without giving any)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from incfs import preconnect
from incfs.loader.config import DEFAULTS
from incfs.mount import umount
from incfs.pack import pack

TESTS = str(Path(__file__).parent)
INCFS = str(Path(sys.executable).with_name("incfs"))


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": TESTS}, **kwargs)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # (a zombie of an init that reaps late)
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_the_child_runs_its_orders_with_the_descriptors_at_their_numbers(tmp_path):
    """The orders' entry point runs as fork_call's child would: its name,
    a session of its own, output to the log, the descriptors at the
    numbers the command had, the command's environment and directory
    (with the variable that says how it started)."""
    log = tmp_path / "log"
    work = tmp_path / "work"
    work.mkdir()
    proc = _python(f"""
        import os
        from incfs import early_fork
        from incfs.mount import MountConfig
        early_fork.start()
        os.chdir({str(work)!r})               # after the fork: the orders bring it
        os.environ["EARLY_TEST"] = "from the command"
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        log = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT, 0o600)
        config = MountConfig(source="/no/such.img", mountpoint="/mnt")
        child = early_fork.take().run("early_child", [str(w), str(go_r)], name="incfs-test",
                                      output=log, keep=(w, go_r), env={{"EXTRA": "1"}},
                                      config=config, early=[])
        for fd in (w, go_r, log):
            os.close(fd)
        print(os.read(r, 4096).decode().strip())
        os.close(go_w)
        print(child.wait(timeout=30))
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    facts, code = out.splitlines()
    assert facts.split() == ["incfs-test", "True", "from", "the", "command", "1", str(work)]
    assert code == "3"
    assert log.read_text() == "to the output\n"


def test_an_unused_child_goes_when_the_command_exits():
    """A command that mounts nothing (a usage error, say) gives no orders:
    the child, alive and named until then, is gone when the command is."""
    proc = _python("""
        import sys, time
        from incfs import early_fork
        from incfs.forked import process_name
        early_fork.start()
        pid = early_fork._waiting.pid
        deadline = time.monotonic() + 10
        while process_name(pid) != "incfs-starting" and time.monotonic() < deadline:
            time.sleep(0.01)  # (it names itself first thing)
        print(pid, process_name(pid), flush=True)
        sys.exit(2)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    pid, name = out.split()
    assert name == "incfs-starting"
    assert _gone(int(pid))


def test_a_command_killed_before_its_orders_leaves_no_child():
    proc = _python("""
        import os, time
        from incfs import early_fork
        early_fork.start()
        print(early_fork._waiting.pid, flush=True)
        time.sleep(60)
    """)
    pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(pid)


def test_the_metadata_request_goes_with_the_orders(tmp_path):
    """A new cache's metadata request goes out on the early connection as
    the orders are sent (by the command: the handshake is done), before
    their entry point runs, which finds it sent, as the daemon would: the
    entry point is held back here until the request was read."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/app.img"
        proc = _python(f"""
            import os, select
            from incfs import early_fork, preconnect
            from incfs.mount import MountConfig
            env, fds = preconnect.open_early({url!r}, 1)
            poller = select.poll()
            poller.register(fds[0], select.POLLOUT)
            poller.poll(5000)  # the handshake is done
            early_fork.start()
            r, w = os.pipe()
            go_r, go_w = os.pipe()
            log = os.open({str(tmp_path / "log")!r}, os.O_WRONLY | os.O_CREAT, 0o600)
            config = MountConfig(source={url!r}, mountpoint="/mnt",
                                 cache={str(tmp_path / "c.img")!r})
            child = early_fork.take().run("early_child", [str(w), str(go_r), {url!r}],
                                          name="incfs-test", output=log, keep=(w, go_r, *fds),
                                          env=env, config=config, early=fds)
            for fd in (w, go_r, log, *fds):
                os.close(fd)
            input()  # the test has read the request
            os.close(go_w)
            facts = os.read(r, 4096).decode().split()
            print(facts[0], facts[-1], child.wait(timeout=30))
        """, stdin=subprocess.PIPE)
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            got = conn.recv(65536)
            out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    assert got == preconnect.range_request(url, DEFAULTS.first_read)
    assert out.split() == ["incfs-test", "asked=True", "3"]
    assert not (tmp_path / "c.img").exists()  # the request only: the daemon makes the cache


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.parametrize("early", ["1", "0"])
def test_a_cold_mount_command_runs_in_its_early_child(tmp_path, small_tree, early):
    """`incfs mount` with no warm process: the supervisor is the early
    child (status says so), and the mount serves the tree; with
    INCFS_EARLY_FORK=0 the command forks it after parsing, as before."""
    image, mnt = tmp_path / "app.img", tmp_path / "mnt"
    pack(small_tree, image)
    mnt.mkdir()
    env = {**os.environ, "INCFS_WARM": "0", "INCFS_EARLY_FORK": early}
    proc = subprocess.run([INCFS, "mount", "--allow-unsigned", str(image), str(mnt)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        status = json.loads((mnt / ".incfs" / "status").read_text())
        assert status["early_start"] is (early == "1")
        assert status["warm_start"] is False
        with open(f"/proc/{status['supervisor_pid']}/comm") as f:
            assert f.read().strip() == "incfs-supervise"
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(small_tree))
        name = next(p for p in small_tree.iterdir() if p.is_file()).name
        assert (mnt / name).read_bytes() == (small_tree / name).read_bytes()
    finally:
        umount(str(mnt))
