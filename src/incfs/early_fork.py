"""A cold `incfs mount` forks its mount's process before it parses, so that
process imports while the command does.

Why: on a cold start the command imports click and the CLI and parses (~35
ms of CPU), and only then did it fork the supervisor, whose daemon imported
trio, h11 and the serving code (~95 ms). The two ran one after the other on
a machine with a second CPU idle. Forked first thing, the child imports on
that CPU while the command parses; `mount.mount_background` then sends it
its orders instead of forking (incfs.forked), and the daemon the child forks
has nothing left to import. docs/startup.md, step 3, has the figures.

The child, `incfs-starting` in ps:
- leads a session of its own at once (a ^C at the terminal is the
  command's, which then ends, and the child with it), with stdin, stdout
  and stderr on /dev/null (a caller reading the command's output to its end
  must not wait for this process);
- imports what the supervisor and the daemon run, looking for its orders
  between two modules;
- takes its orders (`EarlyChild.run`): the entry point, its arguments, the
  command's environment and working directory, and the descriptors it needs,
  passed by SCM_RIGHTS and put at the numbers the command had them at, which
  the arguments name;
- records the new cache's metadata request the command sent with the orders
  (`_ask_here`: the daemon finds it sent), or sends it itself once the
  connection's handshake is done (`loader.cachefile.ask_early`, the daemon's
  first step), then finishes its imports, leaving out the loader's for a
  mount that loads nothing, and runs the entry point as a forked child would
  (`forked.run_child`).

A command that does not mount in the background (a usage error, a mount
point in use) sends no orders: it kills the child when it exits
(`discard`, at exit), and a child whose command died some other way sees
its socket close and exits. Only the console script forks one (a process
with no thread yet): `mount_background` called by a program forks as
before.

Until the fork only the C modules `_socket` and `_signal` load, as in
incfs.console: the command's own imports wait for it. `INCFS_EARLY_FORK=0`
turns it off.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False  # no typing before the fork (see above)
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from .forked import Forked
    from .mount import MountConfig

ENV = "INCFS_EARLY_FORK"
NAME = "incfs-starting"
# What the child imports before its entry point runs, in this order: what
# the metadata request needs (its orders may come while the rest loads),
# the supervisor, trio, then the daemon's way to READY (mount.SERVING_MODULES)
# and a loader's (mount.LOADER_MODULES), which a mount of a local image
# leaves out.
_FIRST = ("incfs.loader.cachefile", "incfs.supervisor", "trio")
# A mount's orders are its config and a few descriptors: a few KiB.
_MAX_ORDERS = 1 << 20
_MAX_FDS = 64

_waiting: EarlyChild | None = None


class EarlyChild:
    """The command's handle on the child it forked early."""

    def __init__(self, pid: int, sock: _socket.socket) -> None:
        self.pid, self._sock = pid, sock

    def run(self, module: str, args: list[str], *, name: str, output: int,
            keep: tuple[int, ...], env: dict[str, str], config: MountConfig,
            early: list[int]) -> Forked | None:
        """Have the child do what `forked.fork_call(module, args, name=name,
        new_session=True, output=output, keep=keep)` would with `env` added
        to this process's environment. `config` is the mount's, `early` its
        early connections (in `keep`): the first request is sent from here
        if it can be. Its Forked, as fork_call's; None if the child is gone
        (killed, say): the caller forks as before, and that daemon asks
        again (the first answer is read, the second makes the connection
        one not to reuse)."""
        import json
        import marshal
        import socket
        from dataclasses import asdict

        from .forked import Forked

        fds = list(dict.fromkeys((*keep, output)))
        orders = {"module": module, "args": args, "name": name, "output": output,
                  "keep": list(keep), "fds": fds, "environ": {**os.environ, **env},
                  "cwd": os.getcwd(), "config": json.dumps(asdict(config)),
                  "asked": _ask_here(config, early)}
        sock = socket.socket(fileno=self._sock.detach())
        try:
            socket.send_fds(sock, [marshal.dumps(orders)], fds)
        except OSError:
            self.discard()
            return None
        finally:
            sock.close()
        return Forked(self.pid)

    def discard(self) -> None:
        """The command will not give orders: end the child now and reap it."""
        import signal

        self._sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _ask_here(config: MountConfig, early: list[int]) -> tuple[int, bytes] | None:
    """Send the first request (`loader.cachefile.ask_early`'s) on the first
    early connection, if its handshake is done: (its descriptor, what was
    sent), for the child to record. From the command, because the child
    looks for its orders only between two modules, and trio is one of ~55
    ms: sent by the child, the request left ~45 ms later, which a 100 ms
    link's start paid in full."""
    from . import preconnect
    from .loader import cachefile

    length = cachefile.first_read(config) if early else None
    request = preconnect.range_request(config.source, length) if length is not None else None
    sent = preconnect.send_request(early[0], request) if request is not None else None
    return (early[0], sent) if sent else None


def start() -> None:
    """Fork the early child (the console script calls this for a cold
    background `mount`, before it imports the command line); a no-op when
    `INCFS_EARLY_FORK=0`."""
    global _waiting
    if _waiting is not None or os.environ.get(ENV) == "0":
        return
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    sys.stdout.flush()  # (nothing the command wrote may come out of the child too)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _child_main(theirs)
    theirs.close()
    _waiting = EarlyChild(pid, ours)
    import atexit  # (a C module) for a command that exits without giving orders

    atexit.register(discard)


def take() -> EarlyChild | None:
    """The early child, for the mount command to hand `mount_background`,
    which gives it its orders (once)."""
    global _waiting
    found, _waiting = _waiting, None
    return found


def discard() -> None:
    """End an early child nobody took."""
    found = take()
    if found is not None:
        found.discard()


# --- the child ------------------------------------------------------------------------

def _child_main(sock: _socket.socket) -> NoReturn:
    """Import, take the orders, run them; never returns."""
    try:
        _detach()
        orders = _import_and_wait(sock)
    except BaseException:  # noqa: BLE001 - its output is the daemon's log once orders came
        import traceback

        traceback.print_exc()
        os._exit(1)
    from .forked import run_child

    run_child(orders["module"], orders["args"], name=orders["name"], new_session=True,
              output=orders["output"], keep=tuple(orders["keep"]))


def _detach() -> None:
    import _signal

    os.setsid()
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # first: the command's stdio is let go at once
        os.dup2(null, fd)
    os.close(null)
    from .forked import set_name

    set_name(NAME)


def _import_and_wait(sock: _socket.socket) -> dict[str, Any]:
    """The imports, with the orders taken (and their request sent) as soon
    as they come between two; then the orders, if they have not come."""
    import select

    _import("incfs.mount")  # what the orders are read with, and the lists below
    from .mount import LOADER_MODULES, SERVING_MODULES

    pending = [*_FIRST, *SERVING_MODULES, *LOADER_MODULES]
    orders: dict[str, Any] | None = None
    while pending or orders is None:
        if orders is None and (not pending or select.select([sock], [], [], 0)[0]):
            orders = _take_orders(sock)
            if not orders["loads"]:
                pending = [name for name in pending if name not in LOADER_MODULES]
        elif orders is not None and not orders["asked"]:
            orders["asked"] = _ask(orders)  # its handshake was still on the wire
        if pending:
            _import(pending.pop(0))
    return orders


def _import(name: str) -> None:
    from importlib import import_module

    try:
        import_module(name)
    except Exception:  # noqa: BLE001 - a warm-up: the real import reports it, in the log
        pass


def _take_orders(sock: _socket.socket) -> dict[str, Any]:
    """Receive the orders (the process exits if none come), place their
    descriptors, take on the command's conditions, send the first request."""
    import json
    import marshal
    import socket

    with socket.socket(fileno=sock.detach()) as conn:
        data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_ORDERS, _MAX_FDS)
    if not data:
        os._exit(0)  # the command mounts nothing: it closed the socket
    orders = marshal.loads(data)
    _place(fds, orders["fds"])
    for fd in (1, 2):  # what goes wrong from here is in the daemon's log
        os.dup2(orders["output"], fd)
    os.environ.clear()
    os.environ.update(orders["environ"])
    from .forked import EARLY_STARTED_ENV

    os.environ[EARLY_STARTED_ENV] = "1"
    os.chdir(orders["cwd"])
    from . import preconnect
    from .mount import MountConfig, runs_loader

    orders["mount"] = MountConfig(**json.loads(orders["config"]))
    orders["loads"] = runs_loader(orders["mount"])
    if orders["asked"] is not None:  # the command sent the request: the daemon finds it sent
        preconnect.asked_on(orders["mount"].source, *orders["asked"])
    orders["asked"] = _ask(orders)
    return orders


def _ask(orders: dict[str, Any]) -> bool:
    """Send the metadata request of a new cache, if it is one; True once
    nothing is left to try (sent, or not to be sent from here)."""
    from . import preconnect
    from .loader import cachefile

    config = orders["mount"]
    cachefile.ask_early(config)
    return not orders["loads"] or preconnect.was_asked(config.source) \
        or not preconnect.available_to(config.source)


def _place(got: list[int], wanted: list[int]) -> None:
    """Put each descriptor received at the number the command had it at:
    first all above every wanted number, so no dup2 closes another."""
    import fcntl

    if len(got) != len(wanted):
        raise OSError("early fork: the descriptors sent do not match their numbers")
    floor = max(wanted, default=0) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in got]
    for fd in got:
        os.close(fd)
    for fd, number in zip(high, wanted):
        os.dup2(fd, number, inheritable=False)  # as a forked child has them
        os.close(fd)
