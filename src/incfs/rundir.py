"""Where a mount's runtime files live: the control socket, the daemon's and
the supervisor's pid files, passthrough markers. One directory per mount
point, 0700, under $XDG_RUNTIME_DIR (or /run for root, /tmp otherwise)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def runtime_dir(mountpoint: str) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "/tmp")
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return Path(base) / f"incfs-{os.geteuid()}" / key
