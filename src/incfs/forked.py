"""Children forked from this interpreter to run an entry point of ours,
watched like a `subprocess.Popen`.

A mount's start is a chain: the `incfs mount` command starts the
supervisor, which starts the first daemon. Each link started afresh costs a
new interpreter (~10 ms) and the modules both sides import again (~15-25
ms), about a tenth of a mount's start. Forking the running interpreter costs
~1 ms. Only processes that have started no thread fork (the command, the
supervisor); a program embedding `mount_background` gets a fresh process,
and later daemons (restarts, upgrades: new code) are started afresh too.

A forked child's /proc/PID/cmdline is its parent's. What a process is, for
the checks that guard against signalling a stranger that reuses a pid,
comes from its name (/proc/PID/comm), which `fork_call` sets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from importlib import import_module

from .procs import wait_gone

TYPE_CHECKING = False  # (an early child imports this first thing: no typing yet)
if TYPE_CHECKING:
    from typing import NoReturn

# Process names (/proc/PID/comm, at most 15 bytes): `incfs restart` signals
# only a process named so, never a stranger that reuses a stale pid.
SUPERVISOR_NAME = "incfs-supervise"
DAEMON_NAME = "incfs-daemon"
# In the environment of a supervisor the warm process forked (incfs.warm),
# until its first daemon has taken it (status: "warm_start").
WARM_STARTED_ENV = "INCFS_WARM_STARTED"
# In the environment of a supervisor (or daemon) the command's early child
# became (incfs.early_fork), until its first daemon has taken it (status:
# "early_start").
EARLY_STARTED_ENV = "INCFS_EARLY_STARTED"


# Signals blocked while fork_call forks (see there).
_HELD_WHILE_FORKING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class Forked:
    """A forked child: what callers of a Popen use of it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is not None and self.poll() is None:
            wait_gone(self.pid, timeout)  # (a zombie counts as gone)
            if self.poll() is None:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        while self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere
                break
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode if self.returncode is not None else 1

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # reaped elsewhere: as Popen's
                os.kill(self.pid, signum)


def fork_call(module: str, args: list[str], *, name: str, close: tuple[int, ...] = (),
              new_session: bool = False, output: int | None = None,
              keep: tuple[int, ...] = ()) -> Forked:
    """`python -m MODULE ARGS` in effect: `MODULE.main(ARGS)` in a forked
    child, which exits with what it returns. The child gets the signal
    dispositions a fresh interpreter has and the process name `name`; it
    closes `close`. With `new_session` it leads a session of its own with
    stdin from /dev/null and stdout and stderr to `output`, and keeps no
    other descriptor than `keep`, as a daemon started with
    Popen(start_new_session=True, pass_fds=keep) would: a fork inherits
    whatever its caller was given (a shell's, make's jobserver pipes), and a
    daemon must not hold those open for its life."""
    sys.stdout.flush()
    sys.stderr.flush()
    # held back while forking: a KeyboardInterrupt raised inside the at-fork
    # callbacks (logging registers some) is printed and dropped, and the ^C
    # with it. Delivered once the mask is back: in the parent here, in the
    # child not at all (a child starts with none pending).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_WHILE_FORKING)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return Forked(pid)
    run_child(module, args, name=name, close=close, new_session=new_session, output=output,
              keep=keep, mask=mask)


def run_child(module: str, args: list[str], *, name: str, close: tuple[int, ...] = (),
              new_session: bool = False, output: int | None = None, keep: tuple[int, ...] = (),
              mask: set[signal.Signals] | None = None) -> NoReturn:
    """The child's side of `fork_call`, for a process forked already (also
    incfs.early_fork's): become the child `fork_call` describes, with the
    signal mask `mask` back once it has, run `MODULE.main(ARGS)` and exit
    with what it returns."""
    code = 1
    try:
        _become_child(name, close, new_session, output, keep)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = import_module(module).main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_child(name: str, close: tuple[int, ...], new_session: bool,
                  output: int | None, keep: tuple[int, ...]) -> None:
    for fd in close:
        os.close(fd)
    signal.set_wakeup_fd(-1)  # a supervisor's: its pipe, closed above
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    set_name(name)
    if new_session:
        if os.getsid(0) != os.getpid():  # (an early child leads its own already)
            os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if output is not None:
            os.dup2(output, 1)
            os.dup2(output, 2)
            # the parent's sys.stdout may not write to fd 1 (a test's capture)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        _close_all_but(keep)


def _close_all_but(keep: tuple[int, ...]) -> None:
    """Close every descriptor above stderr that is not in `keep`."""
    low = 3
    for fd in sorted({fd for fd in keep if fd >= low}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def set_name(name: str) -> None:
    """This process's name (/proc/PID/comm, at most 15 bytes: ps and top
    show it)."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(name[:15])


def process_name(pid: int) -> str | None:
    """The name of process `pid` (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
