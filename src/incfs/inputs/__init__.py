"""Pack inputs: a directory, a tar archive or stream, an OCI image layout.

`open_input(spec)` picks one from the SRC argument of `incfs pack`; every
input yields `Entry` values (see `base`), so pack has one consumer for all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

from ..errors import UsageError
from .base import DEFAULT_MAX_ENTRIES, Entry, Input, ListedInput, normalize
from .dir import DirInput
from .oci import OciInput
from .tar import TarInput
from .tree import Tree, TreeInput


def open_input(spec: str | os.PathLike, *, stdin: BinaryIO | None = None,
               exclude: set[tuple[int, int]] | None = None,
               max_entries: int = DEFAULT_MAX_ENTRIES) -> Input | ListedInput | TreeInput:
    """SRC as given to `incfs pack`: a directory, a tar file (plain, .gz,
    .bz2, .xz, .zst, detected by content), "-" for a tar stream on stdin,
    or oci:DIR[:TAG]."""
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return TarInput("stdin", lambda: stream, max_entries)
    if text.startswith("oci:"):
        return OciInput(text, max_entries)
    path = Path(text)
    if path.is_dir():
        return DirInput(path, exclude)
    if path.is_file():
        return TarInput.from_path(path, max_entries=max_entries)
    raise UsageError(f"{path} is not a directory, a tar archive, '-' or oci:DIR[:TAG]")


__all__ = ["open_input", "Entry", "Input", "ListedInput", "TreeInput", "DirInput", "TarInput",
           "OciInput", "Tree", "normalize", "DEFAULT_MAX_ENTRIES"]
