"""Every default of the built-in loader, in one place, each with its reason.

`MountConfig` (mount.py) and the `incfs mount` options (cli_mount.py) take
their defaults from `DEFAULTS`; the loader reads its tunables from a
`LoaderConfig` built from the mount's configuration (`from_mount`), so a
value is written down exactly once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import preconnect
from ..errors import UsageError

KiB = 1024
MiB = 1024 * KiB


class LoaderConfig(NamedTuple):
    """Tunables of the built-in loader (bytes, seconds, counts)."""

    # Background fetching of what nobody read yet: sequential fills the whole
    # image in source order, so it works offline once done (R8).
    prefetch: str = "sequential"
    # A miss fetches up to this many bytes of source range around the block it
    # needs: one round trip brings the neighbours a reader wants next, while a
    # random 4 KiB reader pays for at most 64 blocks (bounded amplification).
    amplify: int = 256 * KiB
    # ... and the rest of its file too when no more than this is left past
    # that: a program reading a 300-500 KiB file whole then makes one
    # request, not a second round trip for the tail (100 ms a file at
    # 100 ms RTT). Blocks are stored as they stream in (loader/arrivals.py),
    # so the first read does not wait for the tail.
    miss_tail: int = 256 * KiB
    # Source requests in flight at once: enough to fill a 100 Mbit/s x 100 ms
    # link with 256 KiB..1 MiB ranges, few enough for a small HTTP server.
    max_inflight: int = 16
    # Cap on background prefetch in bytes/s (None: no cap); reads never are.
    bandwidth: float | None = None
    # Bytes of requests in flight at once (reads, readahead and prefetch):
    # every range in flight is buffered whole, so this bounds the daemon's
    # memory however fast the reader or wide the window (mountpoint-s3's users
    # complained of a prefetcher that is not bounded).
    inflight_budget: int = 64 * MiB
    # Sequential readers: the readahead window starts at `amplify`, doubles
    # each time the reader reaches it, and stops growing at twice the
    # measured pipeline depth (loader/link.py: 2 x bandwidth x RTT, at least
    # two requests), never past this: more window than keeps the pipe full
    # only costs memory and wasted bytes when the reader stops; 16 MiB covers
    # 2 x the depth of a 1 Gbit/s x 30 ms link.
    readahead_max: int = 16 * MiB
    # Bytes a reader must read in sequence before readahead starts: programs
    # that read small clusters at random places (most of them; the "touch
    # 10%" case) are served by misses and must not pay for a window they never
    # read (bytes fetched <= 1.2x bytes read is a target).
    readahead_after: int = 1 * MiB
    # Longest single range request (reads, readahead, prefetch): long enough
    # that per-request overhead is small, short enough to be split over
    # several connections and to lose little when a connection resets.
    request_max: int = 1 * MiB
    # Background prefetch jobs gather this much source range each.
    prefetch_chunk: int = 1 * MiB
    # Seconds prefetch starts no new job after a read missed (or readahead
    # ran for a reader) further than `prefetch_near` bytes of source from
    # where prefetch is fetching: a
    # program reading here and there (the "touch 10%" case) then has the
    # link to itself, not a fifth of it beside four prefetch jobs (at 100 ms
    # / 10 Mbit/s such a program took 3x as long); one that reads what
    # prefetch brings next (loading a whole model, cp -r) misses within a
    # job or two of it and is not slowed. Long enough to span the gap
    # between a program's reads of one file and the next.
    prefetch_yield: float = 1.0
    prefetch_near: int = 2 * MiB
    # Absent bytes worth fetching to join two ranges into one request (a
    # round trip costs more than 32 KiB at the links we aim at).
    max_gap: int = 32 * KiB
    # The first metadata request: the whole metadata of images up to ~300
    # files (block maps take 16 bytes a file, format.maps), so the tree is
    # visible after one round trip; bigger ones ask for the rest as soon as
    # the superblock is in. Not larger: bytes asked past the metadata's end
    # still cross the link after the reader stops (queues and proxies hold
    # them), ~150 ms at 10 Mbit/s for 256 KiB (bench/link_rate.py startup).
    first_read: int = 64 * KiB
    # Further metadata is fetched in parallel chunks of this size.
    meta_chunk: int = 4 * MiB
    # Seconds to ask an existing cache's source whether it still holds the
    # same image before mounting from the cache alone ("offline").
    probe_timeout: float = 5.0
    # Seconds between syncs of the cache (fills are not synced one by one: a
    # block lost in a crash is fetched again).
    flush_interval: float = 3.0
    # Seconds between status updates the mount shows in .incfs/status.
    status_interval: float = 0.5
    # Seconds between sweeps for waiting reads that no request covers.
    sweep_interval: float = 1.0
    # Longest pause between loader-level retries of a block a read waits for.
    retry_cap: float = 5.0
    # Longest wait for a hash block another request is fetching.
    dep_wait: float = 60.0
    # Seconds reads wait at most, from the mount's start, for an older
    # image (an update's base) to be indexed: its blocks are then copied, not
    # fetched. A big base takes longer to index than a read should wait:
    # after this, reads fetch what they need while indexing goes on.
    base_wait: float = 1.0
    # Blocks looked up per batch when copying blocks from an older image.
    reuse_batch: int = 1024
    # Connections opened at start (each reads the superblock) so first misses
    # do not pay for handshakes; the `incfs` program opens them before it
    # could import this module, hence the value's home in incfs.preconnect.
    warm_connections: int = preconnect.CONNECTIONS
    # Cap on the cache file's allocated bytes (--cache-size; None: no cap).
    # A capped cache holds a working set, not the image: no background
    # prefetch (it would only push out what readers use; incfs.space.cap).
    cache_size: int | None = None

    @classmethod
    def from_mount(cls, config: Any) -> "LoaderConfig":
        """The loader's tunables from a mount configuration (any object with
        attributes of these names; absent or None ones keep the default,
        except `bandwidth`, whose None means "no cap")."""
        values = {}
        for name in cls._fields:
            value = getattr(config, name, None)
            if value is not None:
                values[name] = value
        return DEFAULTS._replace(**values).checked()

    def checked(self) -> "LoaderConfig":
        """This configuration with values raised to their working minimum."""
        amplify = max(4 * KiB, int(self.amplify))
        budget = max(amplify, int(self.inflight_budget))
        prefetch = "none" if self.cache_size else (self.prefetch or "none").strip()
        return self._replace(amplify=amplify, max_inflight=max(1, int(self.max_inflight)),
                             inflight_budget=budget,
                             readahead_max=max(amplify, int(self.readahead_max)),
                             request_max=min(budget, max(amplify, int(self.request_max))),
                             prefetch_chunk=min(budget, max(amplify, int(self.prefetch_chunk))),
                             prefetch=prefetch)

    @property
    def prefetch_slots(self) -> int:
        """Requests background prefetch may hold at once: a quarter, so
        readahead and misses always find free connections."""
        return max(1, self.max_inflight // 4)


DEFAULTS = LoaderConfig()


def check_prefetch(mode: str | None) -> None:
    """Raise UsageError unless `mode` is none, sequential or profile:FILE
    (with a readable FILE)."""
    mode = (mode or "none").strip()
    if mode in ("none", "sequential"):
        return
    if mode.startswith("profile:") and mode != "profile:":
        from ..pack import load_profile  # pack is heavy: only for profiles

        load_profile(mode[len("profile:"):])  # raises UsageError when unusable
        return
    raise UsageError(f"--prefetch must be none, sequential or profile:FILE, not {mode!r}")
