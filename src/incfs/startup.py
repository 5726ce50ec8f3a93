"""How the `incfs` program starts and ends: tuned for `incfs mount`, whose
tree must be visible within a round trip and 150 ms (issue 10).

A mount's start is mostly CPU. The command, its supervisor and its daemon
are one interpreter forked twice (incfs.forked), and before the daemon can
answer the kernel it has imported click, trio, httpx and our modules: on
this machine about two thirds of the time a mount may take. Three things cut
that without changing what is imported (incfs.warm skips the imports
of the next mount's daemon altogether):

* **The cyclic garbage collector is off while modules load.** Importing
  makes a great many objects (code, functions, classes) and no garbage
  cycles, yet the allocations trigger collections that walk them all: about
  a tenth of the import time here (`python -c 'import trio, httpx, ...'`,
  225 against 245 ms). Each process turns the collector back on once its
  imports are done (`imports_done`), after `gc.freeze()` has moved what
  they made out of its sight for good, which also keeps later collections
  from writing to pages a forked child shares.
* **A mount's connections start first.** `incfs mount URL` opens its
  source's TCP connections (incfs.preconnect) before it imports and parses
  its command line, so their handshakes run during that too.
* **The mount command leaves with `os._exit`** once the mount is up and its
  line is printed (`leave_at_once`). The interpreter's teardown (freeing
  every module it loaded) took ~40 ms with trio and httpx loaded, time the
  user waits for the prompt for nothing: the command has nothing left open
  that needs closing, so only stdout and stderr are flushed.

The console script (incfs.console) does this: `incfs.cli.main` run in-process (click's test
runner, an embedding program) keeps the interpreter's usual behaviour.
"""

from __future__ import annotations

import _signal  # not `signal`: imported before the first SYN (its enums cost ~2.5 ms)
import gc
import os
import sys

TYPE_CHECKING = False  # imported before the first SYN (incfs.console): no typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

_leave_at_once = False
_paused = False  # the collector is off because importing() turned it off


def background_mount(argv: list[str]) -> bool:
    """Whether the command line `argv` (without the program's name) looks
    like `incfs mount` without --foreground: the command whose start is
    tuned (its connections opened first, incfs.preconnect; the whole command
    run by the warm process, incfs.warm_client). A guess made before the
    parser runs: a wrong one only costs what the tuning does."""
    return bool(argv) and argv[0] == "mount" and not {"--foreground", "--help", "-h"} & set(argv)


def hold_interrupts() -> None:
    """^C is held back until the command line is ready to report it
    (`take_interrupts`): for a process that runs a command it did not start
    (incfs.warm), which may be told to stop before it got there."""
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})


def take_interrupts() -> None:
    """The command line handles ^C from here on (one held back arrives now)."""
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT})


def run(main: Callable[[], object]) -> NoReturn:
    """Run the command line's `main`, then exit (at once, if the command
    asked for it and succeeded)."""
    try:
        main()
    except SystemExit as done:
        if _leave_at_once and not done.code:
            leave(0)
        raise
    if _leave_at_once:
        leave(0)
    sys.exit(0)


def importing() -> None:
    """This process is about to import most of what it will run: no
    collections until `imports_done`. (A forked child inherits the pause.)"""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def imports_done() -> None:
    """This process has imported what it runs: what that made is kept out of
    the collector's sight, and the collector runs again. Nothing, in a
    process that did not pause it (an embedding program's collector is its
    own)."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def leave_at_once() -> None:
    """The command's work is done and nothing it holds needs closing: exit
    without the interpreter's teardown once it returns successfully."""
    global _leave_at_once
    _leave_at_once = True


def leave(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that went away
            pass
    os._exit(code)
