"""Where image bytes come from: "read these byte ranges of one object".

`open_source(spec)` picks the backend from the spec:

* a local path or `file://` URL -> LocalSource
* `http://` / `https://` URL    -> HttpSource
* `s3://bucket/key`             -> S3Source
* a list of specs               -> MirroredSource over one source per spec

Keyword options go to whichever backends accept them (e.g. `headers` only to
HTTP mirrors, `endpoint_url` only to S3 ones); an option no backend in the
spec knows is an error, so typos do not pass silently.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from incfs.errors import UsageError
from incfs.sources.base import (
    AccessDeniedError,
    NotFoundError,
    ObjectChangedError,
    PermanentSourceError,
    RangeNotSatisfiableError,
    Source,
    SourceError,
    SourceStats,
    TransientSourceError,
)
from incfs.sources.http import HttpSource
from incfs.sources.local import LocalSource
from incfs.sources.mirrors import Mirror, MirroredSource
from incfs.sources.retry import RetryPolicy, call_with_retry
from incfs.sources.s3 import S3Source, parse_s3_url

__all__ = [
    "AccessDeniedError", "HttpSource", "LocalSource", "Mirror", "MirroredSource",
    "NotFoundError", "ObjectChangedError", "PermanentSourceError",
    "RangeNotSatisfiableError", "RetryPolicy", "S3Source", "Source", "SourceError",
    "SourceStats", "TransientSourceError", "call_with_retry", "open_source",
]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Options consumed by MirroredSource itself when the spec is a list.
MIRROR_OPTIONS = frozenset({"cooldown", "retry", "expected_size", "mirror_retry"})


def _backend_for(spec: str) -> tuple[type[Source], dict[str, Any]]:
    """The backend class for one spec and its positional constructor args."""
    match = _SCHEME.match(spec)
    scheme = match[1].lower() if match else ""
    if scheme in ("http", "https"):
        return HttpSource, {"url": spec}
    if scheme == "s3":
        bucket, key = parse_s3_url(spec)
        return S3Source, {"bucket": bucket, "key": key}
    if scheme == "file":
        parts = urllib.parse.urlsplit(spec)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file:// URL with a remote host: {spec!r}")
        return LocalSource, {"path": urllib.parse.unquote(parts.path)}
    if scheme:
        raise UsageError(f"unsupported source scheme {scheme!r} in {spec!r}")
    if not spec:
        raise UsageError("empty source spec")
    return LocalSource, {"path": spec}


def _open_one(spec: str, options: dict[str, Any]) -> Source:
    cls, args = _backend_for(spec)
    accepted: frozenset[str] = getattr(cls, "OPTIONS")
    chosen = {k: v for k, v in options.items() if k in accepted}
    return cls(**args, **chosen)


def open_source(spec: str | os.PathLike[str] | Sequence[str], **options: Any) -> Source:
    """Open `spec` as a Source (no I/O happens until the first call).

    Common options: `retry` (RetryPolicy; for a list, the policy for whole
    fail-over rounds), `name`. HTTP: `headers`, `timeout`, `connect_timeout`,
    `max_connections`, `http2`, `verify`, `check_validators`. S3:
    `endpoint_url`, `region`, `profile`, `version_id`, `max_connections`,
    `timeout`, `connect_timeout`, `client_kwargs`. Mirrors (list spec):
    `cooldown`, `expected_size`, and `mirror_retry` (each mirror's own policy,
    default RetryPolicy.failover(): fail over quickly instead of retrying a
    dead mirror at length).
    """
    if isinstance(spec, (str, os.PathLike)):
        specs = [os.fspath(spec)]
        single = True
    else:
        specs = [os.fspath(s) for s in spec]
        single = len(specs) == 1
        if not specs:
            raise UsageError("empty list of mirrors")
    backends = [_backend_for(s)[0] for s in specs]
    known = set().union(*(getattr(b, "OPTIONS") for b in backends))
    if not single:
        known |= MIRROR_OPTIONS
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"unknown source option(s): {', '.join(sorted(unknown))}")
    if single:
        return _open_one(specs[0], options)

    per_mirror = {k: v for k, v in options.items() if k not in MIRROR_OPTIONS and k != "name"}
    per_mirror["retry"] = options.get("mirror_retry") or RetryPolicy.failover()
    sources: list[Source] = []
    for s in specs:
        sources.append(_open_one(s, per_mirror))
    return MirroredSource(
        sources,
        cooldown=options.get("cooldown", 30.0),
        retry=options.get("retry"),
        expected_size=options.get("expected_size"),
        name=options.get("name"),
    )
