"""The built-in loader: mount a remote (or local) packed image through a
local cache image, fetching blocks on demand and in the background (R8, R9).

One concern per module; dependencies point down this list, never up:

    config    LoaderConfig: every default, with its reason
    cachefile where a mount's cache lives; a new one's metadata request
              sent early (no trio: the daemon's first step)
    remote    the source (or mirror set) a mount reads from
    early     the answer to that early request, read without the HTTP
              client (the mount is up before httpx is imported)
    plan      what a read needs: blocks, hash blocks, coalesced byte ranges
    schedule  who sends when: priorities, byte budget, bandwidth, readahead
    prefetch  background prefetch (sequential, profile) and its gate
    reuse     updates: blocks copied from an older image instead of fetched
    link      the link estimate: bandwidth x RTT sets the pipeline's depth
    cache     creating and resuming the cache image from remote metadata
    tail      the blocks that came with a new cache's metadata, stored
    jobs      running one fetch job: ranges fetched and timed, checked,
              stored, a failed block fetched again from another mirror
    core      the running Loader: reads first, readahead, status, a source
              that changed

Two entry points, called by `mount`: `open_cache(config) -> (Image, Source)`
before the mount, `start_loader(config, service, nursery, source) -> Loader`
once it runs (it takes over the source open_cache fetched the metadata from,
or, when the metadata came early, opens its own once the mount is ready).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Where each public name lives. Loaded on first use (PEP 562), so importing
# `incfs.loader.config` (the CLI does, for its defaults) does not import the
# whole loader, the image code and trio with it.
_HOME = {
    "cache": ["cache_metadata", "fetch_metadata", "image_complete", "old_path", "open_cache",
              "retype_record", "write_cache"],
    "cachefile": ["cache_path", "default_cache"],
    "config": ["DEFAULTS", "LoaderConfig", "check_prefetch"],
    "core": ["Loader", "start_loader"],
    "jobs": ["FetchFailed"],
    "plan": ["Job", "Range", "Want", "plan_ranges"],
    "prefetch": ["source_runs"],
    "remote": ["open_loader_source"],
    "reuse": ["index_blocks", "leaf_digest"],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .cache import (cache_metadata, fetch_metadata, image_complete, old_path, open_cache,
                        retype_record, write_cache)
    from .cachefile import cache_path, default_cache
    from .config import DEFAULTS, LoaderConfig, check_prefetch
    from .core import Loader, start_loader
    from .jobs import FetchFailed
    from .plan import Job, Range, Want, plan_ranges
    from .prefetch import source_runs
    from .remote import open_loader_source
    from .reuse import index_blocks, leaf_digest

__all__ = ["DEFAULTS", "FetchFailed", "Job", "Loader", "LoaderConfig", "Range", "Want",
           "cache_metadata", "cache_path", "check_prefetch", "default_cache", "fetch_metadata",
           "image_complete", "index_blocks", "leaf_digest", "old_path", "open_cache",
           "open_loader_source", "plan_ranges", "retype_record", "source_runs", "start_loader",
           "write_cache"]
