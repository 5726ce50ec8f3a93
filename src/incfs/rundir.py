"""Where a mount's runtime files live: the control socket, the daemon's and
the supervisor's pid files, passthrough markers. One directory per mount
point, 0700, under $XDG_RUNTIME_DIR (or /run for root, /tmp otherwise).

Imported by the `incfs` command before it imports anything costly
(incfs.warm_client finds the warm process's socket here), so pathlib (~7 ms)
and hashlib (~2.5 ms) load only where they are used."""

from __future__ import annotations

import os

from .procs import process_alive

TYPE_CHECKING = False  # typing is not imported either (see above)
if TYPE_CHECKING:
    from pathlib import Path


def runtime_base_text() -> str:
    """This user's directory of them (the warm process's socket lives here too)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "/tmp")
    return os.path.join(base, f"incfs-{os.geteuid()}")


def runtime_base() -> Path:
    from pathlib import Path

    return Path(runtime_base_text())


def runtime_dir(mountpoint: str) -> Path:
    import hashlib

    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return runtime_base() / key


def drop_pid_file(path: Path, pid: int) -> bool:
    """Remove a pid file that still names `pid`, a process known to be gone
    (killed before it could remove the file itself); True if it did. A file
    naming another pid is a newer process's (a new mount of the same point),
    and stays."""
    try:
        if int(path.read_text()) != pid:
            return False
        path.unlink()
    except (OSError, ValueError):
        return False
    return True


def drop_daemon_leftovers(rundir: Path) -> None:
    """What a daemon gone without its own cleanup (SIGKILL) left in its
    mount's runtime directory: its pid file, its control socket (one older
    than that pid file: a newer daemon's socket is made after it) and an
    empty passthrough directory; nothing if the pid file names a process
    alive (a newer daemon's). The directory itself can then be removed."""
    pid_file, sock = rundir / "pid", rundir / "control.sock"
    try:
        pid, written = int(pid_file.read_text()), pid_file.stat().st_mtime_ns
    except (OSError, ValueError):
        return
    if process_alive(pid) or not drop_pid_file(pid_file, pid):
        return
    try:
        if sock.stat().st_mtime_ns <= written:
            sock.unlink()
    except OSError:
        pass
    try:
        (rundir / "passthrough").rmdir()  # only if empty: markers are not ours to judge
    except OSError:
        pass

