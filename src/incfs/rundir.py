"""Where a mount's runtime files live: the control socket, the daemon's and
the supervisor's pid files, passthrough markers. One directory per mount
point, 0700, under $XDG_RUNTIME_DIR (or /run for root, /tmp otherwise)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_base() -> Path:
    """This user's directory of them (the warm process's socket lives here too)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "/tmp")
    return Path(base) / f"incfs-{os.geteuid()}"


def runtime_dir(mountpoint: str) -> Path:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return runtime_base() / key
