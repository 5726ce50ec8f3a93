"""incfs.warm: the warm process a mount command leaves behind, and the
mounts it starts for the next commands (only when nothing would differ
from a cold start)."""

from __future__ import annotations

import json
import marshal
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from incfs import warm
from incfs.forked import process_name
from incfs.pack import pack

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
# the console script: a command reaches the warm process only through it (incfs.console)
INCFS = [str(Path(sys.executable).with_name("incfs"))]


@pytest.fixture
def env(tmp_path):
    """The commands' environment: warm processes on, in a runtime directory
    of this test's own (so its warm process is this test's alone)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    environment = {**os.environ, "INCFS_WARM": "1", "XDG_RUNTIME_DIR": str(run_dir)}
    yield environment
    _stop(environment)


def _stop(environment: dict) -> None:
    pid_file = Path(environment["XDG_RUNTIME_DIR"]) / f"incfs-{os.geteuid()}" / "warm.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    if process_name(pid) == warm.NAME:
        os.kill(pid, 15)


def _sock(environment: dict) -> Path:
    return Path(environment["XDG_RUNTIME_DIR"]) / f"incfs-{os.geteuid()}" / "warm.sock"


def _wait_warm(environment: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            try:
                s.connect(str(_sock(environment)))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError("no warm process answered")


def _incfs(environment: dict, *args, check=True, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(INCFS + [str(a) for a in args], env=environment, capture_output=True,
                          text=True, timeout=120, check=check, preexec_fn=preexec_fn)


@pytest.fixture
def image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello from a warm start\n")
    (src / "big.bin").write_bytes(os.urandom(300_000))
    pack(src, tmp_path / "app.img")
    return src, tmp_path / "app.img"


def _mount(environment: dict, image: Path, mnt: Path, preexec_fn=None) -> dict:
    """Mount a copy of `image` (one image serves one mount at a time)."""
    mnt.mkdir()
    copy = mnt.with_suffix(".img")
    shutil.copyfile(image, copy)
    _incfs(environment, "mount", copy, mnt, "--allow-unsigned", preexec_fn=preexec_fn)
    return json.loads(_incfs(environment, "status", mnt, "--json").stdout)


def test_second_mount_is_started_warm_and_serves(env, image, tmp_path):
    src, img = image
    first = _mount(env, img, tmp_path / "m1")
    try:
        assert first["warm_start"] is False  # nothing was warm yet
        _wait_warm(env)
        second = _mount(env, img, tmp_path / "m2")
        try:
            assert second["warm_start"] is True
            assert (tmp_path / "m2" / "hello.txt").read_text() == "hello from a warm start\n"
            assert (tmp_path / "m2" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
            assert second["supervisor_pid"] and second["pid"] != first["pid"]
            # as a cold start makes them: the supervisor leads a session of its own
            assert os.getsid(second["pid"]) == second["supervisor_pid"]
        finally:
            _incfs(env, "umount", tmp_path / "m2")
    finally:
        _incfs(env, "umount", tmp_path / "m1")
    assert not os.path.ismount(tmp_path / "m2")


def test_the_warm_process_runs_the_command_where_it_was_typed(env, image, tmp_path):
    """Its working directory (a relative mount point), its output and its
    exit status are the command's own."""
    _, img = image
    _mount(env, img, tmp_path / "m1")
    try:
        _wait_warm(env)
        (tmp_path / "m2").mkdir()
        shutil.copyfile(img, tmp_path / "m2.img")
        done = subprocess.run(INCFS + ["mount", "m2.img", "m2", "--allow-unsigned"],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "incfs: mounted m2.img on m2\n"
        assert json.loads(_incfs(env, "status", tmp_path / "m2", "--json").stdout)["warm_start"]
        assert (tmp_path / "m2" / "hello.txt").read_text() == "hello from a warm start\n"
        _incfs(env, "umount", tmp_path / "m2")
        # a failure reads the same as a cold one's: message and exit status
        failed = [_incfs(e, "mount", tmp_path / "m2.img", tmp_path / "m1", "--allow-unsigned",
                         check=False)
                  for e in (env, {**env, "INCFS_WARM": "0"})]
        assert failed[0].returncode == failed[1].returncode == 2
        assert failed[0].stderr == failed[1].stderr
        assert "is already a mount point" in failed[0].stderr
    finally:
        _incfs(env, "umount", tmp_path / "m1")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_command_run_warm_is_stopped_by_its_own_signals(env, image, tmp_path, signum):
    """^C reaches the command, which is in the terminal's process group; the
    warm process's child running it is not, so the command passes it on (a
    SIGTERM too, and then dies of it: the child goes with it, and so the
    command's stderr closes). The warm process was left behind by a command
    that ignored ^C and SIGHUP (`nohup incfs mount ... &` in a script): the
    child takes the dispositions of the command it runs, not its own."""
    _, img = image
    _mount(env, img, tmp_path / "m1", preexec_fn=_like_a_nohup_background_job)
    held = []
    with socket.socket() as server:  # takes connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/app.img"
        try:
            _wait_warm(env)
            (tmp_path / "m2").mkdir()
            command = subprocess.Popen(INCFS + ["mount", "--allow-unsigned", url, tmp_path / "m2"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, preexec_fn=_default_sigint)
            server.settimeout(30)
            held.append(server.accept()[0])  # it has started
            _wait_for_a_child_of_the_warm_process(env)  # and handed itself over
            command.send_signal(signum)
            _, err = command.communicate(timeout=30)
            if signum == signal.SIGINT:
                assert command.returncode == 130, err
                assert err.strip() == "incfs: error: interrupted"  # (click puts a newline first)
            else:
                assert command.returncode == -signal.SIGTERM, err
        finally:
            for conn in held:
                conn.close()
            _incfs(env, "umount", tmp_path / "m1")


def _wait_for_a_child_of_the_warm_process(environment: dict, timeout: float = 30.0) -> None:
    pid = int((_sock(environment).parent / "warm.pid").read_text())
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while not children.read_text().split():
        assert time.monotonic() < deadline, "the warm process started no command"
        time.sleep(0.01)


def _default_sigint() -> None:
    """(A shell's background job ignores SIGINT; Python then never sees it.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _like_a_nohup_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def test_commands_with_the_warm_process_off_start_cold(env, image, tmp_path):
    _, img = image
    first = _mount(env, img, tmp_path / "m1")
    try:
        _wait_warm(env)
        second = _mount({**env, "INCFS_WARM": "0"}, img, tmp_path / "m2")
        assert second["warm_start"] is False
        _incfs(env, "umount", tmp_path / "m2")
    finally:
        _incfs(env, "umount", tmp_path / "m1")
    assert first["warm_start"] is False


def test_orders_of_another_fingerprint_are_refused_and_it_serves_on(env, image, tmp_path):
    _, img = image
    _mount(env, img, tmp_path / "m1")
    try:
        _wait_warm(env)
        r, w = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(_sock(env)))
                command = {"fingerprint": "not this one", "argv": ["incfs", "mount"]}
                socket.send_fds(s, [marshal.dumps(command)], [w, w, w])
                assert marshal.loads(s.recv(4096)) == {}  # no pid: start cold
        finally:
            os.close(r)
            os.close(w)
        second = _mount(env, img, tmp_path / "m2")  # still there, and serving
        assert second["warm_start"] is True
        _incfs(env, "umount", tmp_path / "m2")
    finally:
        _incfs(env, "umount", tmp_path / "m1")


def test_a_command_in_another_mount_namespace_has_another_fingerprint(env):
    """(Its mount would be made there: a warm process outside it must not.)"""
    code = "from incfs.fingerprint import fingerprint; print(fingerprint())"
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout
    there = subprocess.run(["unshare", "-m", sys.executable, "-c", code], capture_output=True,
                           text=True, check=True).stdout
    assert here == again
    assert here != there


def test_a_dead_warm_process_means_a_cold_start(env, image, tmp_path):
    _, img = image
    _mount(env, img, tmp_path / "m1")
    try:
        _wait_warm(env)
        _stop(env)
        deadline = time.monotonic() + 10
        while _sock(env).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # it leaves nothing behind: no socket to refuse, no pid file to trust
        assert not _sock(env).exists() and not (_sock(env).parent / "warm.pid").exists()
        second = _mount(env, img, tmp_path / "m2")
        assert second["warm_start"] is False
        _incfs(env, "umount", tmp_path / "m2")
    finally:
        _incfs(env, "umount", tmp_path / "m1")


def test_a_wedged_warm_process_is_killed_and_the_mount_starts_cold(env, image, tmp_path):
    """It has the orders and never answers (stopped): no cold mount beside
    one it might still make, so it goes first."""
    _, img = image
    _mount(env, img, tmp_path / "m1")
    try:
        _wait_warm(env)
        pid = int((_sock(env).parent / "warm.pid").read_text())
        os.kill(pid, 19)  # SIGSTOP
        second = _mount(env, img, tmp_path / "m2")
        assert second["warm_start"] is False
        deadline = time.monotonic() + 10
        while process_name(pid) == warm.NAME and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "gone"
        assert state in ("gone", "Z")  # killed (a zombie until its parent, init, reaps it)
        _incfs(env, "umount", tmp_path / "m2")
    finally:
        _incfs(env, "umount", tmp_path / "m1")
