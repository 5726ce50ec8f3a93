"""The `incfs` console script (pyproject's entry point).

Its own module because of what must come before the command line's
modules load: the collector paused (incfs.startup) and a background
mount's connections opened (incfs.preconnect.open_at_start). Until they
are, only modules that cost nothing to import may load: this one,
incfs.startup and incfs.preconnect import no more than the interpreter
has already loaded, and `_socket`. Nothing
imports this module, so the command line can import incfs.startup
without a circle.
"""

from __future__ import annotations

import sys

from . import preconnect, startup

TYPE_CHECKING = False  # typing costs ~14 ms before the first SYN (incfs.preconnect)
if TYPE_CHECKING:
    from typing import NoReturn


def program() -> NoReturn:
    startup.importing()
    preconnect.open_at_start(sys.argv[1:])
    from .cli import main

    startup.run(main)
