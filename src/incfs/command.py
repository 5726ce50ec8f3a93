"""The `incfs` console script: a background `incfs mount` forks its mount's
process before the CLI (click) loads, so that process imports the daemon's
modules meanwhile (incfs.early_fork); then the CLI runs as always."""

from __future__ import annotations

import sys


def main():
    from . import early_fork

    early_fork.start(sys.argv[1:])
    from .cli import main as cli_main

    return cli_main()
