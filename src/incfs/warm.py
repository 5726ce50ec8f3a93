"""The warm process: a mount started by an interpreter that has already
imported what a daemon runs.

Most of a cold `incfs mount` is CPU before the daemon can answer the kernel:
its interpreter imports trio, httpx and our modules, ~150 ms on this
machine, where the whole start may take a round trip and 150 ms (issue 10).
So once a mount is up, the command leaves a *warm process* behind (one per
user, `incfs-warm` in ps): a fork of itself that imports all of that and
then waits on a socket in the user's runtime directory. The next
`incfs mount` hands it the mount's orders; it forks the mount's supervisor,
which forks the daemon, both from an interpreter with nothing left to
import. (Mercurial's chg command server skips Python's start the same way.)

It serves a command only when nothing would differ from a cold start. Both
sides compute a *fingerprint* of their conditions, and the two must match:
the interpreter, its flags and module path, the incfs files and the
directories on the module path (an upgrade changes their sizes and times),
the user and groups, every namespace, the root directory, the cgroup,
capabilities, no_new_privs, seccomp and the security label. What may differ
between two commands comes with the orders and is applied in the child:
the environment, the working directory, the umask, resource limits and
niceness. The orders' file descriptors (the ready pipe, the log, the early
connections) come by SCM_RIGHTS. A command that is not served, for any
reason (no warm process, another fingerprint, a refusal, no connection
within `ANSWER_TIMEOUT`), starts its mount cold, as before. One that sent
its orders and got no answer within `STARTING_TIMEOUT` kills the warm
process first (it might still act on them), then starts cold.

The warm process ends after `IDLE` seconds with no orders, or as soon as its
own fingerprint no longer matches (its code was upgraded under it). Only the
owner's commands reach it (the runtime directory is 0700, and it checks the
caller's uid, SO_PEERCRED). `INCFS_WARM=0` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import preconnect, rundir
from .forked import WARM_STARTED_ENV, fork_call, process_name, set_name

NAME = "incfs-warm"  # its /proc/PID/comm: `stop` signals only a process so named
ENV = "INCFS_WARM"  # "0": no warm process is used or left behind
# Seconds the warm process waits for orders before it ends: a user mounting
# a few images in a row (a build, a container start) finds it; an idle one
# does not keep its ~60 MB for long.
IDLE = 600.0
# Seconds a command waits for the warm process's answer before it starts
# its mount cold: the answer takes a fork (a few ms); one that takes longer
# is wedged, and a cold start costs only ~150 ms more.
ANSWER_TIMEOUT = 1.0
# Seconds it may take, once it has the orders, to say it started them: a
# fork. One that has not answered by then is stopped or wedged.
STARTING_TIMEOUT = 10.0
_MAX_ORDERS = 1 << 20  # bytes: the configuration and the environment
_ENTRIES = ("incfs.supervisor", "incfs.mount")  # what orders may start (mount._background_entry)
_RLIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")]


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _path(name: str) -> Path:
    return rundir.runtime_base() / name


# --- the command's side --------------------------------------------------------------

class Started:
    """The supervisor a warm process started for us: not our child, so it is
    watched through a pidfd, and its exit status is not known (a failure
    says why on the ready pipe)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # already gone
            self._pidfd, self.returncode = None, 1

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and self._pidfd is not None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            self._ended()
        return self.returncode if self.returncode is not None else 1

    def _ended(self) -> None:
        os.close(self._pidfd)
        self._pidfd, self.returncode = None, 1


def start(module: str, name: str, config_json: str, ready_fd: int, log_fd: int,
          early_env: dict[str, str], early_fds: list[int]) -> Started | None:
    """Have the warm process start `python -m MODULE CONFIG READY_FD` for
    us, named `name` (as `mount_background` would fork it); None if it is
    not there or does not serve this command: start cold then."""
    if not enabled():
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(ANSWER_TIMEOUT)
            sock.connect(str(_path("warm.sock")))
            orders = {"fingerprint": fingerprint(), "module": module, "name": name,
                      "config": config_json,
                      "environ": {**os.environ, **early_env}, "cwd": os.getcwd(),
                      "umask": _umask(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                      "rlimits": [(r, resource.getrlimit(r)) for r in _RLIMITS]}
            socket.send_fds(sock, [json.dumps(orders).encode()], [ready_fd, log_fd, *early_fds])
            sock.settimeout(STARTING_TIMEOUT)
            try:
                answer = json.loads(sock.recv(4096) or b"{}")
            except TimeoutError:
                # It has our orders and may yet act on them: no cold start
                # beside a mount it might still make. It is killed first.
                _kill_warm()
                return None
    except (OSError, ValueError):
        return None
    return Started(int(answer["pid"])) if answer.get("pid") else None


def _kill_warm() -> None:
    """SIGKILL this user's warm process and the child starting a mount for
    it (its process group), wedged: they never answered."""
    _signal_warm(os.killpg, signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def leave_behind() -> None:
    """Start a warm process for the next mount, unless one is serving (or
    starting), or they are off. Called by the mount command, which forks
    it; the new process detaches and imports while the mount serves."""
    if not enabled() or answers():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        code = 1
        try:
            code = _become_warm()
        finally:
            os._exit(code)


def answers() -> bool:
    """Whether this user's warm process takes connections."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(str(_path("warm.sock")))
        except OSError:
            return False
    return True


def stop() -> None:
    """End this user's warm process, if there is one."""
    _signal_warm(os.kill, signal.SIGTERM)


def _signal_warm(send, signum: int) -> None:
    """`send(pid, signum)` to this user's warm process, if `warm.pid` names
    one (never a stranger that reuses a stale pid: it bears the name)."""
    try:
        pid = int(_path("warm.pid").read_text())
    except (OSError, ValueError):
        return
    if process_name(pid) == NAME:
        with contextlib.suppress(OSError):
            send(pid, signum)


# --- the fingerprint -----------------------------------------------------------------

def fingerprint() -> str:
    """What must be the same in a command and the warm process for a mount
    started by either to be the same (see the module doc). The text itself
    (~7 KB), not a digest of it: hashlib's import (OpenSSL) took ~4 ms of
    the command's start, and comparing 7 KB costs nothing."""
    return "\0".join(repr(part) for part in _conditions())


def _conditions():
    yield sys.executable, sys.version, sys.path, sys.flags, sys.getfilesystemencoding()
    yield os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())
    for ns in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"):
        yield ns, _readlink(f"/proc/self/ns/{ns}")
    yield _readlink("/proc/self/root"), _read("/proc/self/cgroup"), _read("/proc/self/attr/current")
    yield [line for line in _read("/proc/self/status").splitlines()
           if line.startswith(("Cap", "NoNewPrivs", "Seccomp"))]
    for entry in sys.path:  # pip changes a site-packages directory's time
        yield entry, _mtime(entry)
    yield from _package_files()


def _package_files():
    """(path in the package, size, mtime) of every incfs .py and .so file,
    in a fixed order (os.walk: Path.rglob took ~2 ms more here)."""
    package = os.path.dirname(os.path.abspath(__file__))
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                path = os.path.join(root, name)
                stat = os.stat(path)
                yield os.path.relpath(path, package), stat.st_size, stat.st_mtime_ns


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _mtime(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return 0


# --- the warm process ----------------------------------------------------------------

def _become_warm() -> int:
    """The forked child: detach, import, serve orders until idle."""
    os.setsid()
    set_name(NAME)
    lock = os.open(_path("warm.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another one is starting or serving
    # nothing of the command's stays open: a caller reading its stdout to the
    # end (a script, `subprocess.run`) must not wait for this process
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, lock)
    os.closerange(lock + 1, 1 << 16)
    mine = fingerprint()  # before importing: what it imports must be what this describes
    if os.geteuid() == 0:
        os.nice(10)  # its imports give way to the mount that just started (its child undoes it)
    _import_daemon()
    sock_path = _path("warm.sock")
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o077)
    try:
        listener.bind(str(sock_path))
    finally:
        os.umask(old)
    listener.listen(8)
    _path("warm.pid").write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # `warm.stop()` and `incfs` upgrades send SIGTERM: leave through the
    # finally below, so no socket or pid file outlives this process (the
    # mounts it forked reset SIGTERM: incfs.forked.fork_call)
    signal.signal(signal.SIGTERM, _leave)
    try:
        while select.select([listener], [], [], IDLE)[0]:
            conn, _ = listener.accept()
            with conn:
                if not _serve_one(conn, (listener.fileno(), lock), mine):
                    break
    finally:  # (the lock says no other warm process owns these names)
        sock_path.unlink(missing_ok=True)
        _path("warm.pid").unlink(missing_ok=True)
    return 0


def _leave(signum: int, frame) -> None:
    raise SystemExit(0)


def _import_daemon() -> None:
    """What a mount's supervisor and daemon import, nothing that reads the
    environment when imported (that is each mount's own)."""
    from . import fuse, fusefs, image, metrics_http, passthrough, service, supervisor  # noqa: F401
    from .control import server  # noqa: F401
    from .loader import cache, core  # noqa: F401
    from .sources import http

    http._import_httpx()
    import httpcore  # noqa: F401

    with contextlib.suppress(ImportError):
        import h2.connection  # noqa: F401  (an https source's HTTP/2)
    from .sources import early_http  # noqa: F401


def _serve_one(conn: socket.socket, own: tuple[int, ...], mine: str) -> bool:
    """Start the mount one command orders, or refuse. False: this process
    must end (its files changed under it). `own`: descriptors of this
    process that no mount's processes may keep (the lock above all)."""
    conn.settimeout(ANSWER_TIMEOUT)
    fds: list[int] = []
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        message, fds, _, _ = socket.recv_fds(conn, _MAX_ORDERS, 3 + 64)
        orders = json.loads(message)
        if (uid != os.getuid() or orders.get("fingerprint") != mine or len(fds) < 2
                or orders.get("module") not in _ENTRIES):
            conn.send(b"{}")
            return fingerprint() == mine  # else the code it runs is not on disk any more
        pid = os.fork()
        if pid == 0:
            _start_in_child(conn, own, orders, fds)
        os.waitpid(pid, 0)  # it exits as soon as the supervisor is forked
        return True
    except (OSError, ValueError, KeyError):
        return True
    finally:
        preconnect.close_fds(fds)


def _start_in_child(conn: socket.socket, own: tuple[int, ...], orders: dict[str, Any],
                    fds: list[int]) -> None:
    """In a child of the warm process: take on the command's conditions,
    fork the supervisor (a new session, as the command would have), tell
    the command its pid, exit."""
    code = 1
    try:
        ready_fd, log_fd, *early = fds
        os.chdir(orders["cwd"])
        os.umask(orders["umask"])
        for limit, (soft, hard) in orders["rlimits"]:
            resource.setrlimit(limit, (soft, hard))
        os.setpriority(os.PRIO_PROCESS, 0, orders["nice"])
        os.environ.clear()
        os.environ.update(orders["environ"])
        os.environ[WARM_STARTED_ENV] = "1"
        preconnect.renumber(early)
        child = fork_call(orders["module"], [orders["config"], str(ready_fd)],
                          name=orders["name"], new_session=True,
                          close=(conn.fileno(), *own), output=log_fd)
        conn.send(json.dumps({"pid": child.pid}).encode())
        code = 0
    except Exception:  # the command starts its mount cold
        with contextlib.suppress(OSError):
            conn.send(b"{}")
    finally:
        os._exit(code)
