"""incfs.forked: entry points run in forked children, watched like Popen."""

from __future__ import annotations

import os
import signal
import subprocess
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


# --- incfs.early_fork: the `incfs mount` command's child, forked first thing --------------------

def test_an_early_child_runs_its_orders_with_the_fds_at_the_parents_numbers(
        tmp_path: Path) -> None:
    from incfs import early_fork

    early_fork.start(["mount", "SRC", "MNT"])
    child = early_fork.take()
    assert child is not None and early_fork.take() is None
    r, w = os.pipe()
    out, log = tmp_path / "out", tmp_path / "log"
    try:
        with open(log, "wb") as f:
            forked = child.run("forked_child", ["3", str(out), "0", str(w)], name="incfs-early",
                               new_session=True, output=f.fileno(), fds=(w,),
                               env={"INCFS_TEST_EARLY": "given"})
        os.close(w)
        assert forked.wait() == 3
        assert os.read(r, 100) == b"given"  # through the fd number the arguments named
    finally:
        os.close(r)
    assert out.read_text() == "incfs-early True\n"
    assert log.read_text() == "to stdout\n"
    assert "INCFS_TEST_EARLY" not in os.environ


def test_an_early_child_without_orders_exits_quietly() -> None:
    from incfs import early_fork

    early_fork.start(["mount", "SRC", "MNT"])
    child = early_fork.take()
    assert child is not None
    child.sock.close()
    _, status = os.waitpid(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("argv", [["mount", "--foreground", "S", "M"], ["mount", "--help"],
                                  ["status", "M"], []])
def test_no_early_child_unless_a_background_mount(argv: list[str]) -> None:
    from incfs import early_fork

    early_fork.start(argv)
    assert early_fork.take() is None


def test_a_mount_command_that_fails_early_ends_with_its_output_and_leaves_no_child(
        tmp_path: Path) -> None:
    """--key with --allow-unsigned is refused before anything is mounted:
    the command's output ends when it does (the early child holds none of
    its stdio) and the child goes once the command has."""
    import sys
    key = tmp_path / "k"
    key.write_text("x")
    marker = str(tmp_path / "mnt-marker")
    done = subprocess.run([str(Path(sys.executable).with_name("incfs")), "mount", "--key",
                           str(key), "--allow-unsigned", "src.img", marker],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "exclude each other" in done.stderr

    def left() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids

    import time
    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []
