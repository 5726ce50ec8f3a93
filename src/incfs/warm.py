"""The warm process: `incfs mount` run by an interpreter that has already
imported what the command, the supervisor and the daemon run.

Most of a cold `incfs mount` is CPU: its interpreter imports click, trio,
httpx and our modules, ~200 ms on this machine, where the whole start may
take a round trip and 150 ms (issue 10). So once a mount is up, the command
leaves a *warm process* behind (one per user, `incfs-warm` in ps): a fork of
itself that imports all of that and then waits on a socket in the user's
runtime directory. The next `incfs mount` sends it the whole command
(incfs.warm_client) ~20 ms into its start; a child of the warm process takes
on the command's conditions and runs it, and the supervisor and the daemon
it forks have nothing left to import. (Mercurial's chg command server skips
Python's start the same way.)

It serves a command only when nothing would differ from a cold start: both
sides compute a fingerprint of their conditions (incfs.fingerprint), and the
two must match. What may differ between two commands comes with the command
and is applied in the child: the environment, the working directory, the
umask, resource limits, niceness and the signals it ignores (of those it
passes on); stdin, stdout, stderr and the early connections come by
SCM_RIGHTS.

The warm process ends after `IDLE` seconds with no command, or as soon as
its own fingerprint no longer matches (its code was upgraded under it). Only
the owner's commands reach it (the runtime directory is 0700, and it checks
the caller's uid, SO_PEERCRED). `INCFS_WARM=0` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import resource
import select
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from . import preconnect, startup
from .fingerprint import fingerprint
from .forked import WARM_STARTED_ENV, set_name
from .warm_client import (ANSWER_TIMEOUT, ENV, MAX_MESSAGE, NAME, RELAYED, STREAMS, enabled,
                          runtime_file, socket_path, stop)

__all__ = ["ENV", "NAME", "answers", "enabled", "leave_behind", "stop"]

# Seconds the warm process waits for a command before it ends: a user
# mounting a few images in a row (a build, a container start) finds it; an
# idle one does not keep its ~60 MB for long.
IDLE = 600.0
_MAX_FDS = len(STREAMS) + 64  # the command's streams and its early connections


def _path(name: str) -> Path:
    return Path(runtime_file(name))


def leave_behind(command_line: Callable[[], object]) -> None:
    """Start a warm process for the next mount, unless one is serving (or
    starting), or they are off. Called by the mount command once its mount
    is up, which forks it; the new process detaches and imports while the
    mount serves, and runs later commands with `command_line` (the `incfs`
    click group: it reads sys.argv)."""
    if not enabled() or WARM_STARTED_ENV in os.environ or answers():
        return  # (a command the warm process runs has one: its own parent)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() == 0:
        code = 1
        try:
            code = _become_warm(command_line)
        finally:
            os._exit(code)


def answers() -> bool:
    """Whether this user's warm process takes connections."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(socket_path())
        except OSError:
            return False
    return True


# --- the warm process ----------------------------------------------------------------

def _become_warm(command_line: Callable[[], object]) -> int:
    """The forked child: detach, import, serve commands until idle."""
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
    # the children running commands are reaped by the kernel: this process
    # waits for none of them (several commands may run at once)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # `warm.stop()` and `incfs` upgrades send SIGTERM: leave through the
    # finally below, so no socket or pid file outlives this process (the
    # children running commands reset it: _run_command)
    signal.signal(signal.SIGTERM, _leave)
    try:
        while select.select([listener], [], [], IDLE)[0]:
            conn, _ = listener.accept()
            with conn:
                if not _serve_one(conn, (listener.fileno(), lock), mine, command_line):
                    break
    finally:  # (the lock says no other warm process owns these names)
        sock_path.unlink(missing_ok=True)
        _path("warm.pid").unlink(missing_ok=True)
    return 0


def _leave(signum: int, frame) -> None:
    raise SystemExit(0)


def _import_daemon() -> None:
    """What a mount's supervisor and daemon import (the command line, the
    command's, is loaded already), nothing that reads the environment when
    imported (that is each command's own)."""
    from importlib import import_module

    from . import supervisor  # noqa: F401
    from .mount import LOADER_MODULES, SERVING_MODULES
    from .sources import http

    for name in (*SERVING_MODULES, *LOADER_MODULES):
        import_module(name)

    http._import_httpx()
    import httpcore  # noqa: F401

    with contextlib.suppress(ImportError):
        import h2.connection  # noqa: F401  (an https source's HTTP/2)
    from .sources import early_http  # noqa: F401


def _serve_one(conn: socket.socket, own: tuple[int, ...], mine: str,
               command_line: Callable[[], object]) -> bool:
    """Run the command one `incfs` process sends, in a child, or refuse it.
    False: this process must end (its files changed under it). `own`:
    descriptors of this process that no child may keep (the lock above all)."""
    conn.settimeout(ANSWER_TIMEOUT)  # the command is sent with the connection (warm_client)
    fds: list[int] = []
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():  # (before its message is read: marshal trusts its input)
            conn.send(marshal.dumps({}))
            return True
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, _MAX_FDS)
        command = marshal.loads(message)
        if (command.get("fingerprint") != mine or len(fds) < len(STREAMS)
                or not command.get("argv")):
            conn.send(marshal.dumps({}))
            return fingerprint() == mine  # else the code it runs is not on disk any more
        if os.fork() == 0:
            _run_command(conn, own, command, fds, command_line)
        return True
    except (OSError, ValueError, EOFError, TypeError, AttributeError):
        return True
    finally:
        preconnect.close_fds(fds)


def _run_command(conn: socket.socket, own: tuple[int, ...], command: dict[str, Any],
                 fds: list[int], command_line: Callable[[], object]) -> None:
    """In a child of the warm process: take on the command's conditions and
    streams (or refuse: it then runs cold), say it runs it, run its command
    line, send its exit status."""
    code = 1
    try:
        set_name("incfs")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in own:
            os.close(fd)
        try:
            _take_conditions(command, fds)
        except (OSError, ValueError, KeyError, TypeError):  # limits it may not raise, say
            conn.send(marshal.dumps({}))
            os._exit(1)
        startup.hold_interrupts()  # the command passes a ^C on once it has this pid
        conn.send(marshal.dumps({"pid": os.getpid()}))
        code = _run_cli(command_line, command["argv"])
    except BaseException:  # noqa: BLE001  (a bug: what a cold command would print)
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.send(marshal.dumps({"exit": code}))
        os._exit(code)


def _take_dispositions(ignored: list[int]) -> None:
    """The signals the command passes on, ignored where it ignores them (a
    shell's background job ignores ^C) and as in a fresh interpreter
    elsewhere. Not this process's own: it may have been started by a
    background job, and a ^C passed on to a command run from a terminal
    would then be ignored."""
    for signum in RELAYED:
        if signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        elif signum == signal.SIGINT:
            signal.signal(signum, signal.default_int_handler)
        else:
            signal.signal(signum, signal.SIG_DFL)


def _take_conditions(command: dict[str, Any], fds: list[int]) -> None:
    """What may differ between two commands, as the sender has it."""
    streams, early = fds[:len(STREAMS)], fds[len(STREAMS):]
    for fd, target in zip(streams, STREAMS):
        os.dup2(fd, target)
    preconnect.close_fds(streams)
    if sys.stdout is not None:  # set up for /dev/null: line buffered on a terminal,
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as a fresh one's would be
    os.chdir(command["cwd"])
    os.umask(command["umask"])
    for limit, (soft, hard) in command["rlimits"]:
        resource.setrlimit(limit, (soft, hard))
    os.setpriority(os.PRIO_PROCESS, 0, command["nice"])
    _take_dispositions(command["ignored"])
    os.environ.clear()
    os.environ.update(command["environ"])
    os.environ[WARM_STARTED_ENV] = "1"
    if command["early"]:
        preconnect.received(command["early"], early)
    else:
        preconnect.close_fds(early)


def _run_cli(command_line: Callable[[], object], argv: list[str]) -> int:
    """The command line's exit status, as the interpreter would make it."""
    sys.argv = argv
    try:
        command_line()
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)
        return 1
    return 0
