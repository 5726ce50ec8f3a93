"""The `incfs` console script (pyproject's entry point).

Its own module because of what must come before the command line's
modules load: the collector paused (incfs.startup), a background mount's
connections opened (incfs.preconnect.open_at_start), the whole command
handed to the warm process when one serves it (incfs.warm_client), and if
not, the mount's process forked to import while the command line does
(incfs.early_fork). Until then only modules that cost nothing to import may
load: this one, incfs.startup, incfs.preconnect, incfs.warm_client (with
what it imports) and incfs.early_fork load no more than the interpreter has
already loaded and the C modules `_signal`, `_socket`, `atexit`, `marshal`,
`resource` and `struct`. Nothing imports this module, so the command line
can import incfs.startup without a circle.
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
    if startup.background_mount(sys.argv[1:]):
        from . import warm_client

        status = warm_client.run_in_warm(sys.argv)  # None: not served, run it here
        if status is not None:
            startup.leave(status)
        from . import early_fork

        early_fork.start()  # the mount's process imports while the command line does
    from .cli import main

    startup.run(main)
