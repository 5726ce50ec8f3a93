"""Reading a mount's status file (`.incfs/status`): shared by the CLI,
the native hand-off and the demo, so none of them imports another."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError


def read_status(mountpoint: str) -> dict:
    """The status of the incfs mount at `mountpoint` (UsageError if it is
    not one)."""
    path = Path(mountpoint) / ".incfs" / "status"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UsageError(f"{mountpoint} is not an incfs mount") from None
