"""What must be the same in an `incfs` command and the warm process that
runs it (incfs.warm) for the outcome to be the same as a cold start.

Both sides compute `fingerprint()` and the warm process serves a command
only when the two are equal. It is computed by the command before it has
imported anything costly (incfs.warm_client runs ~20 ms into its start), so
this module imports only `os` and `sys`.
"""

from __future__ import annotations

import os
import sys

# Variables the interpreter or the locale read once, at the start: the warm
# process's streams and encodings were set up from its own, so a command
# with other values must start cold.
_STARTUP_VARIABLES = ("LANG", "LANGUAGE")
_STARTUP_PREFIXES = ("PYTHON", "LC_")


def fingerprint() -> str:
    """The conditions as text (~7 KB), not a digest of them: hashlib's
    import (OpenSSL) took ~4 ms of the command's start, and comparing 7 KB
    costs nothing."""
    return "\0".join(repr(part) for part in _conditions())


def _conditions():
    yield sys.executable, sys.version, sys.path, sys.flags, sys.getfilesystemencoding()
    yield sorted((key, value) for key, value in os.environ.items()
                 if key in _STARTUP_VARIABLES or key.startswith(_STARTUP_PREFIXES))
    yield os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())
    for ns in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"):
        yield ns, _readlink(f"/proc/self/ns/{ns}")
    yield _readlink("/proc/self/root"), _read("/proc/self/cgroup"), _read("/proc/self/attr/current")
    yield [line for line in _read("/proc/self/status").splitlines()
           if line.startswith(("Cap", "NoNewPrivs", "Seccomp"))]
    for entry in sys.path:  # pip changes a site-packages directory's time
        yield entry, _mtime(entry)
    yield from _package_files()


def _package_files():
    """(path in the package, size, mtime) of every incfs .py and .so file,
    in a fixed order (os.walk: Path.rglob took ~2 ms more here)."""
    package = os.path.dirname(os.path.abspath(__file__))
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                path = os.path.join(root, name)
                stat = os.stat(path)
                yield os.path.relpath(path, package), stat.st_size, stat.st_mtime_ns


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _mtime(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return 0
