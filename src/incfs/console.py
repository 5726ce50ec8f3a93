"""The `incfs` console script (pyproject's entry point).

Its own module because of what must come before the command line's
modules load: the collector paused (incfs.startup) and a background
mount's connections opened (incfs.preconnect.open_at_start). Nothing
imports this module, so the command line can import incfs.startup
without a circle.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from . import startup


def program() -> NoReturn:
    startup.importing()
    from . import preconnect
    from .loader.config import DEFAULTS

    preconnect.open_at_start(sys.argv[1:], DEFAULTS.warm_connections)
    from .cli import main

    startup.run(main)
