"""Where a mount's cache file lives, and the first request of a new one.

Without trio, the HTTP client or the image code, so the daemon can call
`ask_early` first thing after it is forked: on a cold start its imports take
~90 ms more before the client could send anything, and on a 100 ms link the
metadata's answer is then already on its way (docs/startup.md, step 4).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import preconnect
from .config import LoaderConfig


def default_cache(config) -> Path:
    """Where the cache of a mount lives when no --cache is given: one file
    per (source, mount point) under $XDG_CACHE_HOME/incfs."""
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "incfs"
    base.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{config.source}\0{os.path.realpath(config.mountpoint)}".encode())
    return base / f"{key.hexdigest()[:20]}.img"


def cache_path(config) -> Path:
    return Path(config.cache) if config.cache else default_cache(config)


def ask_early(config) -> None:
    """Send the metadata request of a new cache (`cache.fetch_metadata`'s
    first) on a connection opened early, if its handshake is done
    (incfs.preconnect.ask_early): the HTTP client, imported later, then finds
    the request sent and its answer on the way."""
    length = first_read(config)
    if length is not None:
        preconnect.ask_early(config.source, length)


def first_read(config) -> int | None:
    """How much the request `ask_early` sends for `config` asks for, if one
    may be sent early: not for a cache that exists (it is probed first),
    with mirrors (any may be asked) or with headers of the caller's (the
    request would not be the client's)."""
    if config.mirrors or (config.source_options or {}).get("headers"):
        return None
    length = LoaderConfig.from_mount(config).first_read
    if preconnect.range_request(config.source, length) is None:
        return None  # not a plain http URL (a local image's cache path is not ours to make)
    return None if cache_path(config).exists() else length
