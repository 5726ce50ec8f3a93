"""Where image bytes come from: "read these byte ranges of one object".

`open_source(spec)` picks the backend from the spec (through the registry,
`incfs.sources.registry`, where each backend declares its schemes):

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
    SourceIdentity,
    SourceStats,
    TransientSourceError,
)
from incfs.sources.http import HttpSource
from incfs.sources.local import LocalSource
from incfs.sources.mirrors import Mirror, MirroredSource
from incfs.sources.retry import RetryPolicy, call_with_retry
from incfs.sources.registry import backend_for, is_remote, open_one, options_for, preload
from incfs.sources.s3 import S3Source, parse_s3_url

__all__ = [
    "AccessDeniedError", "HttpSource", "LocalSource", "Mirror", "MirroredSource",
    "NotFoundError", "ObjectChangedError", "PermanentSourceError",
    "RangeNotSatisfiableError", "RetryPolicy", "S3Source", "Source", "SourceError",
    "SourceIdentity", "SourceStats", "TransientSourceError", "backend_for", "call_with_retry",
    "is_remote", "open_source", "options_for", "parse_s3_url", "preload",
]

#: Options consumed by MirroredSource itself when the spec is a list.
MIRROR_OPTIONS = MirroredSource.OPTIONS


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
    known = options_for(specs[:1] if single else specs)
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"unknown source option(s): {', '.join(sorted(unknown))}")
    if single:
        return open_one(specs[0], options)

    per_mirror = {k: v for k, v in options.items() if k not in MIRROR_OPTIONS and k != "name"}
    per_mirror["retry"] = options.get("mirror_retry") or RetryPolicy.failover()
    sources: list[Source] = []
    for s in specs:
        sources.append(open_one(s, per_mirror))
    return MirroredSource(
        sources,
        cooldown=options.get("cooldown", 30.0),
        retry=options.get("retry"),
        expected_size=options.get("expected_size"),
        name=options.get("name"),
    )
