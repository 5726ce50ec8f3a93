"""incfs.forked: entry points run in forked children, watched like Popen."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from incfs.forked import fork_call, process_name


def test_the_child_runs_the_entry_point_and_exits_with_its_code(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = fork_call("forked_child", ["7", str(out), "0"], name="incfs-test-name")
    assert child.wait() == 7
    assert out.read_text() == "incfs-test-name False\n"  # same session as ours


def test_a_new_session_with_its_output_in_a_file(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "log"
    with open(log, "wb") as f:
        child = fork_call("forked_child", ["0", str(out), "0"], name="incfs-test",
                          new_session=True, output=f.fileno())
    assert child.wait() == 0
    assert out.read_text() == "incfs-test True\n"
    assert log.read_text() == "to stdout\n"


def test_wait_times_out_and_the_child_dies_of_signals_as_a_fresh_one_would(
        tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # ours; the child's is the default
    try:
        child = fork_call("forked_child", ["0", str(tmp_path / "out"), "30"], name="incfs-sleep")
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.2)
        assert child.poll() is None
        assert process_name(child.pid) == "incfs-sleep"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
        child.send_signal(signal.SIGTERM)  # gone: nothing is signalled
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_name_is_cut_to_what_the_kernel_keeps(tmp_path: Path) -> None:
    child = fork_call("forked_child", ["0", str(tmp_path / "out"), "0"],
                      name="incfs-a-very-long-process-name")
    assert child.wait() == 0
    assert (tmp_path / "out").read_text().split()[0] == "incfs-a-very-lo"
    assert process_name(os.getpid()) is not None
    assert process_name(child.pid) is None  # reaped


def test_a_new_session_keeps_only_the_descriptors_it_is_given(tmp_path: Path) -> None:
    """A daemon forked from a command must not hold what the command's own
    caller gave it (a shell's or make's pipes) open for its life."""
    out, log = tmp_path / "out", tmp_path / "log"
    inherited_r, inherited_w = os.pipe()
    kept_r, kept_w = os.pipe()
    try:
        with open(log, "wb") as f:
            child = fork_call("forked_child", ["0", str(out), "0.5"], name="incfs-test",
                              new_session=True, output=f.fileno(), keep=(kept_w,))
        deadline = time.monotonic() + 30
        while not out.exists():  # its entry point has started (and sleeps 0.5 s)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fds = {int(fd) for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert child.wait() == 0
        assert kept_w in fds
        assert inherited_r not in fds and inherited_w not in fds and kept_r not in fds
        assert fds <= {0, 1, 2, kept_w}, fds
    finally:
        for fd in (inherited_r, inherited_w, kept_r, kept_w):
            os.close(fd)
