"""incfs.supervisor's loop: signals are acted on there, not in handlers.

The supervisor is driven here with real child processes standing in for
the daemon; tests/test_restart.py drives it under real mounts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from incfs.forked import Forked
from incfs.supervisor import Signals, Supervisor

# A stand-in daemon: says each SIGUSR2 it gets on stdout, lives 60 s.
COUNTS_USR2 = ("import signal, sys, time\n"
               "signal.signal(signal.SIGUSR2, lambda *_: print('usr2', flush=True))\n"
               "print('ready', flush=True)\n"
               "time.sleep(60)\n")


@pytest.fixture
def signals():
    """The supervisor's signal handling, installed in this process for the
    test and taken out after."""
    saved = {signum: signal.getsignal(signum) for signum in Signals.HANDLED}
    prior = signal.set_wakeup_fd(-1)
    installed = Signals()
    try:
        yield installed
    finally:
        signal.set_wakeup_fd(prior)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        for fd in installed.fds:
            os.close(fd)


def supervisor_of(daemon, signals: Signals) -> Supervisor:
    sup = Supervisor("{}", None, Path("/nonexistent"), signals)
    sup.daemon = daemon
    return sup


def later(seconds: float, signum: int) -> threading.Thread:
    """Send this process `signum` after `seconds`, from another thread."""
    def send() -> None:
        time.sleep(seconds)
        os.kill(os.getpid(), signum)
    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_a_handler_only_notes_the_signal_and_the_loop_acts_once(signals):
    child = subprocess.Popen([sys.executable, "-c", COUNTS_USR2], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        sup = supervisor_of(child, signals)
        os.kill(os.getpid(), signal.SIGUSR1)  # two `incfs restart`s at once
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not sup.upgrade_requested  # the handlers did nothing to the daemon
        sup._act_on_signals()
        assert sup.upgrade_requested
        assert child.stdout.readline() == "usr2\n"
        os.kill(os.getpid(), signal.SIGUSR1)  # one more while it winds down: joins
        sup._act_on_signals()
    finally:
        child.terminate()
        rest, _ = child.communicate(timeout=30)
    assert rest == ""  # one SIGUSR2 in all


def test_the_wait_passes_a_sigterm_on_and_wakes_when_the_daemon_ends(signals):
    child = subprocess.Popen(["sleep", "60"])
    sup = supervisor_of(child, signals)
    sender = later(0.2, signal.SIGTERM)
    assert sup._wait_daemon() == -signal.SIGTERM
    sender.join()


def test_the_wait_returns_the_code_of_a_forked_daemon(signals):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.2)
        os._exit(3)
    assert supervisor_of(Forked(pid), signals)._wait_daemon() == 3


def test_an_upgrade_request_cuts_the_backoff_short(signals):
    fuse_stand_in, keep_open = os.pipe()  # no errors, no hang-up: sleeps
    try:
        sup = supervisor_of(None, signals)
        sup.fuse_fd = fuse_stand_in
        sender = later(0.2, signal.SIGUSR1)
        start = time.monotonic()
        assert sup._sleep_unless_unmounted(60) is False
        assert sup.upgrade_requested and time.monotonic() - start < 30
        sender.join()
        assert sup._sleep_unless_unmounted(0) is False
        os.close(keep_open)
        keep_open = None
        assert sup._sleep_unless_unmounted(60) is True  # the hang-up: "unmounted"
    finally:
        os.close(fuse_stand_in)
        if keep_open is not None:
            os.close(keep_open)


def test_signalling_a_forked_child_reaped_elsewhere_is_no_error():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    child = Forked(pid)
    os.waitpid(pid, 0)  # reaped behind its back: its pid may be anyone's soon
    child.send_signal(signal.SIGUSR2)
    assert child.wait() == 1  # (its code went to the other waiter)
