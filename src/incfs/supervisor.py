"""The supervisor: keeps a mount's FUSE connection alive across daemon deaths
and upgrades.

The kernel ends a FUSE connection when the last file descriptor of
/dev/fuse is closed. So the supervisor, a small process that does nothing
else, holds one: the daemon (`python -m incfs.mount`; the first one is
forked from the supervisor, see incfs.forked) mounts, and once the
kernel's INIT is answered it hands its /dev/fuse fd and what INIT settled up
to the supervisor over an inherited socket pair (SCM_RIGHTS; no socket on
disk, so nobody else can take the mount over). When the daemon dies (kill
-9, an OOM kill, a crash) or is asked to make way (`incfs restart`), the
supervisor starts a new one on the same fd. The new daemon skips INIT and
asks the kernel to resend every request the dead one had read but not
answered (FUSE_NOTIFY_RESEND), so programs see a pause, not an error.
Inode numbers are the image's own, so the kernel's node ids stay valid.

A daemon that was serving is replaced at once; one that dies before it
serves (it says READY on a pipe when it does) is retried with backoff
(0.1 s doubling to 5 s), and after `MAX_FAILURES` such starts in a row the
supervisor gives up and the connection is closed: its
programs then get ENOTCONN (a clean error), and umount works as ever. The
supervisor ends when the connection does (unmount or abort), or when the
daemon ends cleanly after an unmount.

Signals: SIGUSR1 = upgrade (the daemon gets SIGUSR2, exits after a clean
close, and a new one starts at once; requests that come while one is under
way join it); SIGTERM/SIGINT are passed to the daemon (a lazy unmount). One
that finds no daemon serving (none runs, or one dies of it before it
serves: the supervisor is backing off) is answered here with the same lazy
unmount, if the mount at the mount point is still this connection's.
Their handlers only note them: the supervisor's loop acts on them (see
`Signals`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import preconnect, startup
from .forked import (DAEMON_NAME, EARLY_STARTED_ENV, SUPERVISOR_NAME, WARM_STARTED_ENV, Forked,
                     fork_call, process_name, set_name)
from .kmount import fuse_device_at
from .rundir import drop_daemon_leftovers, runtime_dir

log = logging.getLogger("incfs.supervisor")

HANDOVER_EXIT = 75      # the daemon's exit code when it made way for a new one
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
MAX_FAILURES = 10       # daemons in a row that died before serving again
HANDOVER_ACK_TIMEOUT = 5.0  # s the first daemon waits for the supervisor's word (it takes µs)


class Signals:
    """The signals the supervisor has got, for its loop to act on. A handler
    only notes a signal (set_wakeup_fd writes its number to a pipe, which
    also wakes the loop's poll). Acting in the handler itself is not safe: it
    can run just after waitpid() has reaped the daemon and before its return
    code is recorded, and a signal sent then finds no process (ESRCH, which
    once ended the supervisor and the mount with it) or, were the pid reused,
    another one. SIGCHLD is noted too: it is how the loop learns that the
    daemon ended."""

    HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in self.HANDLED:
            signal.signal(signum, _note)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def fileno(self) -> int:
        return self._read

    @property
    def fds(self) -> tuple[int, int]:
        return self._read, self._write

    def take(self) -> list[int]:
        """The signals noted since the last take, oldest first."""
        numbers = b""
        while True:
            try:
                chunk = os.read(self._read, 4096)
            except BlockingIOError:
                return list(numbers)
            if not chunk:
                return list(numbers)
            numbers += chunk


def _note(_signum: int, _frame: object) -> None:
    """A handler that does nothing: the wakeup fd has the signal's number."""


class Supervisor:
    def __init__(self, config_json: str, ready_fd: int | None, rundir: Path,
                 signals: Signals):
        self.config_json = config_json
        self.signals = signals
        self.ready_fd = ready_fd
        self.rundir = rundir
        self.fuse_fd: int | None = None
        self.connection: dict | None = None
        self.restarts = 0
        self.daemon: subprocess.Popen | Forked | None = None
        self.upgrade_requested = False
        self.stop_requested = False  # SIGTERM/SIGINT came: a lazy unmount is wanted
        self.mount_device: tuple[int, int] | None = None  # this connection's, once mounted
        self._ready_r: int | None = None  # the running daemon's ready pipe (None: first one)

    # --- the first daemon -------------------------------------------------------

    def start_first(self, pid_file: Path) -> int | None:
        """Run the first daemon; returns an exit code if it never handed
        over (it failed, and said why on the ready pipe). Once it has, the
        supervisor's pid file is written before the daemon hears back, so
        the mount is reported ready only with it in place (`incfs restart`
        and status find the supervisor there)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [self.config_json, str(self.ready_fd) if self.ready_fd is not None else "-",
                "--handover", str(theirs.fileno())]
        self.daemon = fork_call("incfs.mount", args, name=DAEMON_NAME,
                                close=(ours.fileno(), *self.signals.fds))
        theirs.close()
        preconnect.hand_over()  # the early connections are the daemon's now
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
        handed = _receive_handover(ours)
        if handed is None:
            ours.close()
            return self.daemon.wait()
        self.fuse_fd, self.connection = handed
        pid_file.write_text(f"{os.getpid()}\n")
        with contextlib.suppress(OSError):  # (a daemon gone meanwhile: its end is seen in run)
            ours.send(b"K")
        ours.close()
        self.mount_device = fuse_device_at(self._mountpoint())
        return None

    # --- later daemons ----------------------------------------------------------------

    def restart(self) -> None:
        self.restarts += 1
        state = json.dumps({"connection": self.connection, "restarts": self.restarts})
        ready_r, ready_w = os.pipe()  # the daemon says READY here once it serves
        args = [self.config_json, str(ready_w), "--resume", str(self.fuse_fd), state]
        try:
            self.daemon = self._spawn(args, [self.fuse_fd, ready_w])
        finally:
            os.close(ready_w)
        os.set_blocking(ready_r, False)
        self._ready_r = ready_r

    def _served(self) -> bool:
        """Whether the daemon that just ended had got as far as serving (the
        first one did: it handed the connection over)."""
        fd, self._ready_r = self._ready_r, None
        if fd is None:
            return True
        try:
            return os.read(fd, 64).startswith(b"READY")
        except OSError:
            return False
        finally:
            os.close(fd)

    def _spawn(self, args: list[str], pass_fds: list[int]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "incfs.mount", *args],
                                pass_fds=pass_fds, stdin=subprocess.DEVNULL)

    # --- watching -----------------------------------------------------------------------

    def run(self) -> int:
        """Restart at once a daemon that had been serving (a kill, a crash, an
        upgrade: programs are waiting); back off only for daemons that die
        before they serve (a bad config, a missing image), and give up after
        MAX_FAILURES of those in a row."""
        failures, backoff = 0, BACKOFF_FIRST
        while True:
            code = self._wait_daemon()
            served = self._served()
            if self.stop_requested and code != 0 and not served:
                self._unmount_lazily()  # it died (of the signal, say) before it could
            if code == 0 or not self._connected():
                return 0  # unmounted: the daemon (or the kernel) said so
            if code == HANDOVER_EXIT or self.upgrade_requested or served:
                self.upgrade_requested = False
                failures, backoff = 0, BACKOFF_FIRST
                if code != HANDOVER_EXIT:
                    log.warning("daemon %d ended with %s; restarting it",
                                self.daemon.pid, _describe_exit(code))
            else:
                failures += 1
                log.warning("daemon %d ended with %s; restart %d in %.1f s",
                            self.daemon.pid, _describe_exit(code), self.restarts + 1, backoff)
                if failures > MAX_FAILURES:
                    log.error("%d daemons in a row failed: giving the connection up", failures)
                    return 1
                if self._sleep_unless_unmounted(backoff):
                    return 0
                self.upgrade_requested = False  # (if one cut the sleep short: this start)
                backoff = min(backoff * 2, BACKOFF_MAX)
            self.restart()

    def _wait_daemon(self) -> int:
        """The daemon's exit code, once it has ended; meanwhile, act on the
        signals the supervisor gets. A signal that comes after a look is in
        the pipe, so the wait that follows wakes for it at once."""
        poller = select.poll()
        poller.register(self.signals.fileno(), select.POLLIN)
        while True:
            self._act_on_signals()
            code = self.daemon.poll()
            if code is not None:
                return code
            poller.poll()

    def _connected(self) -> bool:
        """False once the kernel has ended the connection."""
        return not self._sleep_unless_unmounted(0)

    def _sleep_unless_unmounted(self, seconds: float) -> bool:
        """Sleep `seconds`, or until the kernel ends the connection (True) or
        an upgrade is asked for (False: a new daemon is wanted now).
        /dev/fuse is polled for nothing but its errors and hang-ups, which
        poll always reports: requests waiting for the next daemon (readable)
        and the device's constant writability do not wake it."""
        poller = select.poll()
        poller.register(self.fuse_fd, 0)
        poller.register(self.signals.fileno(), select.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            for fd, events in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                if fd == self.fuse_fd and events & (select.POLLERR | select.POLLHUP
                                                    | select.POLLNVAL):
                    return True
            self._act_on_signals()
            if self.upgrade_requested or time.monotonic() >= deadline:
                return False

    # --- signals --------------------------------------------------------------------------

    def _act_on_signals(self) -> None:
        for signum in self.signals.take():
            if signum == signal.SIGUSR1:
                self._upgrade()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_requested = True
                if self._daemon_running():
                    self._signal_daemon(signum)
                else:
                    self._unmount_lazily()

    def _mountpoint(self) -> str:
        return json.loads(self.config_json)["mountpoint"]

    def _unmount_lazily(self) -> None:
        """What a daemon does on SIGTERM, for when none can: detach the
        mount (the kernel then ends the connection once its last user is
        gone, and the supervisor ends with it). Only if the mount at the
        mount point is still this connection's (its device number, noted
        when it was mounted): after a `umount -l` the path may hold another
        mount, which is not ours to detach."""
        from .fuse.device import unmount

        mountpoint = self._mountpoint()
        if self.mount_device is None or fuse_device_at(mountpoint) != self.mount_device:
            log.warning("no daemon serves, and %s is not this mount any more: not unmounted",
                        mountpoint)
            return
        try:
            unmount(mountpoint, lazy=True)
        except OSError as e:
            log.warning("no daemon serves, and %s could not be unmounted: %s", mountpoint, e)
        else:
            log.info("no daemon serves: %s unmounted lazily", mountpoint)

    def _upgrade(self) -> None:
        """Ask the daemon to make way, once: a second request while it winds
        down joins the first (a second SIGUSR2 would kill it mid-way, after
        its handler is gone), and both see the same new daemon."""
        if not self.upgrade_requested:
            self.upgrade_requested = True
            self._signal_daemon(signal.SIGUSR2)

    def _daemon_running(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def _signal_daemon(self, signum: int) -> None:
        """Only this loop reaps the daemon, so until it has, its pid is its
        own (a zombie at worst, which a signal does not harm)."""
        if self._daemon_running():
            self.daemon.send_signal(signum)


def _receive_handover(sock: socket.socket) -> tuple[int, dict] | None:
    """The daemon's fd and INIT result, or None if it ended without them."""
    try:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    except OSError:
        return None
    if not fds:
        return None
    try:
        return fds[0], json.loads(message.decode())
    except ValueError:
        os.close(fds[0])
        return None


def hand_over(sock_fd: int, fuse_fd: int, connection: dict) -> None:
    """The daemon's side: give the supervisor the connection."""
    with socket.socket(fileno=sock_fd) as sock:
        socket.send_fds(sock, [json.dumps(connection).encode()], [fuse_fd])
        sock.settimeout(HANDOVER_ACK_TIMEOUT)
        with contextlib.suppress(OSError):  # (no answer: the supervisor died; serve on)
            sock.recv(1)  # its pid file is written: the mount may be reported ready


def restart_daemon(mountpoint: str, timeout: float) -> tuple[int | None, int]:
    """`incfs restart`: ask the supervisor for a new daemon and wait until it
    serves; returns (old pid, new pid). Only the mount's owner (or root) may
    signal the supervisor: that is the check."""
    from .errors import IncfsError, UsageError

    rundir = runtime_dir(mountpoint)
    try:
        supervisor = int(supervisor_pid_file(rundir).read_text())
    except (OSError, ValueError):
        raise UsageError(f"{mountpoint} has no supervised incfs daemon "
                         "(mounted with --foreground, or not mounted)") from None
    old = _serving_pid(rundir)  # None while another restart is under way
    if process_name(supervisor) != SUPERVISOR_NAME:
        raise UsageError(f"pid {supervisor} is not the supervisor of {mountpoint}")
    os.kill(supervisor, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _serving_pid(rundir)
        if new is not None and new != old and _answers(rundir / "control.sock", new):
            return old, new
        time.sleep(0.05)
    raise IncfsError(f"no new daemon serves {mountpoint} after {timeout:g} s "
                     f"(supervisor {supervisor}; see its log)")


def _serving_pid(rundir: Path) -> int | None:
    try:
        return int((rundir / "pid").read_text())
    except (OSError, ValueError):
        return None


def _answers(sock_path: Path, pid: int) -> bool:
    """The control socket is up and served by daemon `pid`."""
    from .control.client import Client

    try:
        with Client.connect_socket(str(sock_path), timeout=5) as client:
            return int(client.status().get("pid", 0)) == pid
    except OSError:
        return False


def _describe_exit(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def supervisor_pid_file(rundir: Path) -> Path:
    return rundir / "supervisor.pid"


def main(argv: list[str]) -> int:
    set_name(SUPERVISOR_NAME)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config_json = argv[0]
    ready_fd = int(argv[1]) if len(argv) > 1 and argv[1] != "-" else None
    rundir = runtime_dir(json.loads(config_json)["mountpoint"])
    sup = Supervisor(config_json, ready_fd, rundir, Signals())
    pid_file = supervisor_pid_file(rundir)
    code = sup.start_first(pid_file)
    if code is not None:
        return code
    startup.imports_done()  # forked from the mount command with the collector off
    os.environ.pop(WARM_STARTED_ENV, None)  # later daemons start afresh: cold
    os.environ.pop(EARLY_STARTED_ENV, None)
    try:
        return sup.run()
    finally:
        pid_file.unlink(missing_ok=True)
        os.close(sup.fuse_fd)
        drop_daemon_leftovers(rundir)  # a daemon of ours killed: its files
        try:
            rundir.rmdir()  # only if the daemon left it empty
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
