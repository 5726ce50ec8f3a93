"""The `incfs mount` command forks its mount's process first thing, before it
imports click and parses its arguments, so the modules the supervisor and
the daemon need are imported while the command does its own start.

Why: the command's interpreter, click and the CLI take ~50 ms before
`mount_background` forks (incfs.forked), and only then did the child start
importing trio, httpx and our daemon modules (~130 ms): the two ran one
after the other on a machine with a second core idle. Forked early, the
child imports while the parent parses; `mount_background` then gives it
what to run instead of forking.

The child waits for its orders on a socket: the module to run, its
arguments, what to add to its environment, and the file descriptors it
needs (passed with SCM_RIGHTS and placed at the numbers the parent had
them, which the arguments and the environment name). A command that does
not mount in the background (a usage error, --help, --foreground) never
sends orders: the child sees the socket close and exits without a word.

Only the command uses this (its process has started no thread when it
forks); a program calling `mount_background` is not forked at all.
Stdlib only, like incfs.preconnect: it runs before anything else loads.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
from importlib import import_module

# What the supervisor and the first daemon import, in the order they do:
# the daemon's modules are imported lazily where they are used (incfs.mount),
# so naming them here is a warm-up only; a name that fails is left for the
# real import to report.
_DAEMON_MODULES = ("incfs.supervisor", "incfs.mount", "trio", "incfs.image", "incfs.loader",
                   "incfs.fuse", "incfs.fusefs", "incfs.control.server", "incfs.service",
                   "incfs.passthrough", "incfs.sources")
_SOURCE_MODULES = {"http://": ("httpx", "incfs.sources.http", "incfs.sources.early_http"),
                   "https://": ("httpx", "incfs.sources.http", "incfs.sources.early_http"),
                   "s3://": ("boto3", "incfs.sources.s3")}
_NOT_BACKGROUND = frozenset({"--help", "-h", "--foreground"})
_MAX_ORDERS = 1 << 20  # bytes: a mount's config and arguments are a few KiB
_MAX_FDS = 64

_waiting: "EarlyChild | None" = None


class EarlyChild:
    """The parent's handle on the child forked early."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid, self.sock = pid, sock

    def run(self, module: str, args: list[str], *, name: str, new_session: bool,
            output: int | None, fds: tuple[int, ...], env: dict[str, str]):
        """Have the child run `MODULE.main(ARGS)` as forked.run_child would
        (with `fds` at the same numbers and `env` added); its Forked."""
        from .forked import Forked

        keep = tuple(dict.fromkeys((*fds, *((output,) if output is not None else ()))))
        orders = {"module": module, "args": args, "name": name, "new_session": new_session,
                  "output": output, "fds": list(keep), "env": env}
        try:
            socket.send_fds(self.sock, [json.dumps(orders).encode()], list(keep))
        finally:
            self.sock.close()
        return Forked(self.pid)

    def discard(self) -> None:
        """Let the child go (it exits when the socket closes) and reap it."""
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def start(argv: list[str]) -> None:
    """Fork the early child if `argv` (the command's arguments) is a
    background `mount`; a no-op otherwise."""
    global _waiting
    if _waiting is not None or argv[:1] != ["mount"] or _NOT_BACKGROUND & set(argv):
        return
    if os.environ.get("INCFS_NO_EARLY_FORK"):
        return
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent.close()
        _child_main(child, _modules(argv))
    child.close()
    _waiting = EarlyChild(pid, parent)


def take() -> EarlyChild | None:
    """The early child, for `mount_background` to give orders to (once)."""
    global _waiting
    found, _waiting = _waiting, None
    return found


def discard() -> None:
    """The command will not mount in the background: let the child go."""
    found = take()
    if found is not None:
        found.discard()


def _modules(argv: list[str]) -> tuple[str, ...]:
    extra = [mods for arg in argv for prefix, mods in _SOURCE_MODULES.items()
             if arg.startswith(prefix)]
    return _DAEMON_MODULES + tuple(m for mods in extra for m in mods)


def _child_main(sock: socket.socket, modules: tuple[str, ...]) -> None:
    """The child: import, wait for orders, run them; never returns."""
    from .forked import run_child

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a ^C before the orders: go quietly
    # hold none of the command's stdio: whoever reads its output must see it
    # end when the command ends (the orders bring the daemon's log)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        for name in modules:
            try:
                import_module(name)
            except Exception:  # noqa: BLE001 - a warm-up; the real import reports it
                pass
        orders = _receive(sock)
    except BaseException:  # noqa: BLE001 - nothing to run: say nothing, the parent goes on
        os._exit(1)
    if orders is None:
        os._exit(0)
    os.environ.update(orders["env"])
    run_child(orders["module"], orders["args"], name=orders["name"],
              new_session=orders["new_session"], output=orders["output"])


def _receive(sock: socket.socket) -> dict | None:
    """The orders, with their fds placed; None if the parent sent none."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_ORDERS, _MAX_FDS)
    finally:
        sock.close()
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    orders = json.loads(data)
    _place(fds, orders["fds"])
    return orders


def _place(got: list[int], wanted: list[int]) -> None:
    """Move each received fd to the number the parent had it at. First out
    of the way (above every wanted number), so no dup2 closes another."""
    if len(got) != len(wanted):
        raise OSError("early fork: the fds sent do not match their numbers")
    floor = max(wanted, default=0) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in got]
    for fd in got:
        os.close(fd)
    for fd, number in zip(high, wanted):
        os.dup2(fd, number, inheritable=False)  # as a forked child has them
        os.close(fd)
