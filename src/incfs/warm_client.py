"""An `incfs mount` command handed whole to the warm process (incfs.warm).

The command's own start was most of what a warm mount still cost: before it
could hand the warm process a mount's orders it had imported click, our
command line and the mount code and parsed its arguments, ~30-65 ms on this
machine (by the day), on the way to a tree that should be visible ~150 ms
after a round trip. The warm process has all of that imported. So the console script
(incfs.console), once it has opened the source's connections, sends the warm
process its whole command instead: the arguments, the environment, the
working directory, umask, limits, niceness and which of ^C, SIGTERM and
SIGHUP it ignores, and by SCM_RIGHTS its stdin, stdout and stderr and the
early connections. The warm process forks a
child that takes on those conditions and runs the command line as this
process would have, writing to our terminal; this process waits for its
exit status and exits with it. Only `mount` without `--foreground` comes
here (incfs.startup.background_mount).

Whatever refuses (no warm process, another fingerprint, descriptors that
cannot be passed, no connection within ANSWER_TIMEOUT) leaves the command
to run here, cold, as before. One that took the command and did not say it
started it within STARTING_TIMEOUT is killed first: it might still act.

This module runs ~20 ms into the command's start, before anything costly is
imported: it uses `_socket`, `_signal`, `marshal` and `struct` (the
`socket`, `json` and `signal` modules cost ~14, ~6 and ~2.5 ms here). The
messages are marshal's format: both ends are the same interpreter (the
fingerprint says so), and only the owner reaches the socket (its directory
is 0700, and the warm process checks the caller's uid before it reads a
message). An environment too big for one message (~200 KB) starts cold.
"""

from __future__ import annotations

import _signal  # not `signal`: its enums cost ~2.5 ms here (see above)
import _socket
import marshal
import os
import resource
import struct
import sys

from . import preconnect
from .fingerprint import fingerprint
from .rundir import runtime_base_text

NAME = "incfs-warm"  # its /proc/PID/comm: `stop` signals only a process so named
ENV = "INCFS_WARM"  # "0": no warm process is used or left behind
# Seconds a command waits for the warm process to take its connection
# before it starts cold: accept() takes microseconds; one that takes longer
# is wedged, and a cold start costs only ~150 ms more.
ANSWER_TIMEOUT = 1.0
# Seconds it may take, once it has the command, to say it started it (a
# fork: a few ms; 3 s is a thousand times that, for a machine under load).
# One that has not by then is stopped or wedged, and the user's command
# has waited this long before it starts cold.
STARTING_TIMEOUT = 3.0
MAX_MESSAGE = 1 << 20  # bytes: the command, its environment above all
STREAMS = (0, 1, 2)  # passed first, in this order; the early connections follow
# The signals that stop a command, passed on to the child running it (_Relay)
RELAYED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
_RLIMITS = [getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")]


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def runtime_file(name: str) -> str:
    """warm.sock, warm.pid, warm.lock: in the user's runtime directory."""
    return os.path.join(runtime_base_text(), name)


def socket_path() -> str:
    return runtime_file("warm.sock")


def run_in_warm(argv: list[str]) -> int | None:
    """Have the warm process run this command (`argv`: sys.argv); its exit
    status, or None when it does not: run it in this process then."""
    if not enabled() or not _streams_open():
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    relay = _Relay()
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(socket_path())
        pid = _hand_over(sock, argv)
    except (OSError, ValueError, EOFError, TypeError):
        pid = None
    if pid is None:
        sock.close()
        relay.refused()
        return None
    try:
        relay.started(pid)
        return _exit_status(sock, pid)
    finally:
        sock.close()


def _streams_open() -> bool:
    try:
        for fd in STREAMS:
            os.fstat(fd)
    except OSError:  # a closed stdin, say: nothing to pass
        return False
    return True


def _hand_over(sock: _socket.socket, argv: list[str]) -> int | None:
    """Send the command; the pid of the child running it, or None (refused)."""
    early = preconnect.at_start()
    fds = [*STREAMS, *(early[1] if early else ())]
    command = {"fingerprint": fingerprint(), "argv": argv, "environ": dict(os.environ),
               "cwd": os.getcwd(), "umask": _umask(),
               "nice": os.getpriority(os.PRIO_PROCESS, 0),
               "rlimits": [(r, resource.getrlimit(r)) for r in _RLIMITS],
               "ignored": [s for s in RELAYED if _signal.getsignal(s) == _signal.SIG_IGN],
               "early": early[0] if early else None}
    rights = struct.pack(f"{len(fds)}i", *fds)
    sock.sendmsg([marshal.dumps(command)],
                 [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    sock.settimeout(STARTING_TIMEOUT)
    try:
        answer = marshal.loads(sock.recv(4096) or marshal.dumps({}))
    except TimeoutError:
        # it has the command and may yet run it: no cold start beside it
        kill_warm()
        return None
    return answer.get("pid") or None


def _exit_status(sock: _socket.socket, pid: int) -> int:
    """Wait for the child running our command to end; its exit status."""
    sock.settimeout(None)
    try:
        message = sock.recv(4096)
    except OSError as e:
        message = b""
        sys.stderr.write(f"incfs: lost the warm process's child (pid {pid}): {e}\n")
    try:
        return int(marshal.loads(message)["exit"])
    except (ValueError, EOFError, TypeError, KeyError):
        sys.stderr.write(f"incfs: error: the warm process's child running this command "
                         f"(pid {pid}) ended without an exit status\n")
        return 1


class _Relay:
    """The signals that stop a command (^C, SIGTERM, SIGHUP), caught while
    the warm process's child runs it: that child is in no terminal's process
    group, so they are passed on to it. One that comes before the child's
    pid is known (a fork away) waits for it. After a SIGTERM or a SIGHUP
    this process ends by the same signal, as a command run here would; after
    a ^C the child says `interrupted` and its status comes back. A signal
    this process ignores (a shell's background job ignores ^C) stays so."""

    SIGNALS = RELAYED

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        self.saved = {}
        for signum in self.SIGNALS:
            handler = _signal.getsignal(signum)
            if handler != _signal.SIG_IGN:
                self.saved[signum] = handler
                _signal.signal(signum, self._caught)

    def _caught(self, signum: int, frame) -> None:
        if self.pid is None:
            self.pending.append(signum)
        else:
            self._pass_on(signum)

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self._pass_on(signum)

    def refused(self) -> None:
        """Nothing runs the command: this process's handlers are back, and
        what came meanwhile acts on it now."""
        for signum, handler in self.saved.items():
            _signal.signal(signum, handler)
        for signum in self.pending:
            os.kill(os.getpid(), signum)

    def _pass_on(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except OSError:
            pass
        if signum != _signal.SIGINT:
            _signal.signal(signum, _signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def kill_warm() -> None:
    """SIGKILL this user's warm process and the children running commands
    for it (its process group), wedged: they never answered."""
    signal_warm(os.killpg, _signal.SIGKILL)


def stop() -> None:
    """End this user's warm process, if there is one."""
    signal_warm(os.kill, _signal.SIGTERM)


def signal_warm(send, signum: int) -> None:
    """`send(pid, signum)` to this user's warm process, if `warm.pid` names
    one (never a stranger that reuses a stale pid: it bears the name)."""
    from .forked import process_name

    try:
        with open(runtime_file("warm.pid")) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    if process_name(pid) == NAME:
        try:
            send(pid, signum)
        except OSError:
            pass
