"""Where a mount's runtime files live: the control socket, the daemon's and
the supervisor's pid files, passthrough markers. One directory per mount
point, 0700, under $XDG_RUNTIME_DIR (or /run for root, /tmp otherwise).

Imported by the `incfs` command before it imports anything costly
(incfs.warm_client finds the warm process's socket here), so pathlib (~7 ms)
and hashlib (~2.5 ms) load only where they are used."""

from __future__ import annotations

import os

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
