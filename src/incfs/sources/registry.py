"""The one registry of source backends: which class serves which spec.

Each `Source` class declares its `SCHEMES`, `OPTIONS` and whether it is
`REMOTE`; everything that needs to know "what kind of source is this?"
(`open_source`, the loader's option filtering, `mount.is_remote`) asks here
instead of matching URL prefixes by hand, so a new backend is one class and
one line in `BACKENDS`.

Importing this module is cheap: the backends import their client libraries
(httpx, boto3) only when a source of theirs is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from incfs.errors import UsageError
from incfs.sources.base import Source
from incfs.sources.http import HttpSource
from incfs.sources.local import LocalSource
from incfs.sources.mirrors import MirroredSource
from incfs.sources.s3 import S3Source

#: Every backend, in the order specs are matched.
BACKENDS: tuple[type[Source], ...] = (LocalSource, HttpSource, S3Source)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(spec: str) -> str:
    """The lower-cased URL scheme of `spec`, "" for a plain path."""
    match = _SCHEME.match(spec)
    return match[1].lower() if match else ""


def backend_for(spec: str) -> type[Source]:
    """The Source class that serves `spec`; UsageError for unknown schemes."""
    scheme = scheme_of(spec)
    for backend in BACKENDS:
        if scheme in backend.SCHEMES:
            return backend
    raise UsageError(f"unsupported source scheme {scheme!r} in {spec!r}")


def preload(specs: list[str]) -> None:
    """Import what opening `specs` (every source a process will open: a
    mount's source and mirrors) needs; nothing for an unknown spec: opening
    it will say what is wrong."""
    backends = []
    for spec in specs:
        try:
            backend = backend_for(spec)
        except UsageError:
            continue
        if backend not in backends:
            backends.append(backend)
    for backend in backends:
        backend.preload(specs)


def is_remote(spec: str) -> bool:
    """Whether `spec` names a source read over the network (so a mount of it
    runs the built-in loader with a cache). Words that are no source spec at
    all (e.g. "empty") are not remote."""
    try:
        return backend_for(spec).REMOTE
    except UsageError:
        return False


def options_for(specs: Iterable[str]) -> frozenset[str]:
    """Options some backend of `specs` accepts (with the mirror set's own
    options when there is more than one spec)."""
    specs = list(specs)
    known = set().union(*(backend_for(s).OPTIONS for s in specs))
    if len(specs) > 1:
        known |= MirroredSource.OPTIONS
    return frozenset(known)


def open_one(spec: str, options: dict[str, Any]) -> Source:
    """One backend for one spec, with the options it accepts."""
    cls = backend_for(spec)
    chosen = {k: v for k, v in options.items() if k in cls.OPTIONS}
    return cls(**cls.spec_args(spec), **chosen)
