"""Prometheus text exposition (format 0.0.4) of a mount's status.

Rendered from the status dict (`Service.status()`, the STATUS answer and
`.incfs/status` are the same thing), never from the live objects: then
`incfs metrics MOUNTPOINT` (another process) and the daemon's `/metrics`
print exactly the same text, and a key that a future status lacks is
simply left out instead of breaking the exporter.

docs/metrics.md lists every name; keep the two in step.
"""

from __future__ import annotations

import math
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "incfs_"

# (status key, metric name without prefix, help). Counters only ever grow
# over the life of one daemon; names end in _total as Prometheus expects.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("bytes_read", "bytes_read_total", "Bytes returned to programs reading the mount."),
    ("bytes_fetched", "bytes_fetched_total", "Bytes of blocks fetched from a remote source."),
    ("bytes_filled", "bytes_filled_total", "Bytes of blocks handed in by loaders over the control socket."),
    ("bytes_reused", "bytes_reused_total", "Bytes of blocks copied from a base cache instead of fetched."),
    ("reads", "reads_total", "Read requests answered."),
    ("misses", "misses_total", "Blocks a read had to wait for (pending reads created)."),
    ("timeouts", "read_timeouts_total", "Reads that failed with ETIME after the read timeout."),
    ("reads_failed", "reads_failed_total", "Pending reads a loader gave up on (the read failed)."),
    ("reads_abandoned", "reads_abandoned_total", "Pending reads whose reading process died."),
    ("verify_failures", "verify_failures_total", "Blocks that failed integrity verification."),
    ("read_errors", "read_errors_total", "Reads answered with an I/O error."),
    ("blocks_repaired", "blocks_repaired_total", "Bad cached blocks dropped and fetched again."),
    ("blocks_written", "blocks_written_total", "Blocks stored by fills (loaders, the built-in loader, reuse)."),
    ("restarts", "restarts_total", "Times the daemon was restarted under a live mount."),
)

GAUGES: tuple[tuple[str, str, str], ...] = (
    ("files", "files", "Regular files in the image."),
    ("inodes", "inodes", "Inodes in the image."),
    ("blocks_present", "blocks_present", "Data and hash-tree blocks present locally."),
    ("blocks_total", "blocks", "Data and hash-tree blocks of every file."),
    ("pending_reads", "pending_reads", "Blocks that reads are waiting for right now."),
    ("uptime_s", "uptime_seconds", "Seconds since the daemon started."),
    ("read_timeout", "read_timeout_seconds", "Seconds a read waits for a block (absent: forever)."),
)

# Counters of the built-in loader (status["loader"]), when it runs.
LOADER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("requests", "loader_requests_total", "Requests the built-in loader sent to its source."),
    ("bytes_transferred", "loader_bytes_transferred_total", "Bytes the built-in loader received."),
    ("errors", "loader_errors_total", "Source requests that failed for good."),
    ("retries", "loader_retries_total", "Blocks the built-in loader asked for again."),
    ("refetches", "loader_refetches_total", "Blocks fetched again after being dropped or refused."),
    ("crc_failures", "loader_crc_failures_total", "Fetched blocks that failed their CRC."),
    ("blocks_failed", "loader_blocks_failed_total", "Blocks the built-in loader gave up on."),
    ("blocks_fetched", "loader_blocks_fetched_total", "Blocks the built-in loader stored."),
    ("leaves_built", "loader_leaves_built_total",
     "Leaf hash blocks built from fetched data instead of fetched."),
    ("leaves_fetched", "loader_leaves_fetched_total",
     "Leaf hash blocks fetched after all: the one built from the data failed its check."),
)

# The cache cap (status["space"], under --cache-size).
SPACE_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("cache_size", "cache_size_bytes", "gauge", "The cap on the cache file's allocated bytes."),
    ("allocated", "cache_allocated_bytes", "gauge", "Bytes the cache file takes on disk now."),
    ("allocated_peak", "cache_allocated_peak_bytes", "gauge", "Most bytes the cache file took on disk."),
    ("blocks_released", "cache_blocks_released_total", "counter", "Data blocks given up to stay under the cap."),
    ("bytes_released", "cache_bytes_released_total", "counter", "Disk bytes given back by those releases."),
    ("blocks_refetched", "cache_blocks_refetched_total", "counter", "Released blocks fetched again because a read needed them."),
    ("over_cap", "cache_over_cap_total", "counter", "Fills stored over the cap (nothing left that could go)."),
)

# Per-source counters (status["loader"]["sources"][i]), labelled by source.
SOURCE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("requests", "source_requests_total", "Requests sent to one source (mirror)."),
    ("bytes", "source_bytes_total", "Payload bytes one source delivered."),
    ("errors", "source_errors_total", "Failed attempts against one source, retried ones included."),
    ("retries", "source_retries_total", "Attempts beyond the first against one source (and fail-overs)."),
)


def render(status: dict) -> str:
    """The exposition text of one status dict, ending in a newline."""
    lines: list[str] = []
    for key, name, text in COUNTERS:
        _scalar(lines, status.get(key), name, "counter", text)
    for key, name, text in GAUGES:
        _scalar(lines, status.get(key), name, "gauge", text)
    if "complete" in status:
        _scalar(lines, int(bool(status["complete"])), "complete", "gauge",
                "1 once every block of the image is present.")
    loader = status.get("loader") or {}
    for key, name, text in LOADER_COUNTERS:
        _scalar(lines, loader.get(key), name, "counter", text)
    space = status.get("space") or {}
    for key, name, kind, text in SPACE_METRICS:
        _scalar(lines, space.get(key), name, kind, text)
    _sources(lines, status)
    histogram = (status.get("miss_latency") or {}).get("histogram")
    if histogram:
        _histogram(lines, "miss_latency_seconds",
                   "Seconds a read waited for absent blocks.", histogram)
    _info(lines, status)
    return "\n".join(lines) + "\n"


def _scalar(lines: list[str], value, name: str, kind: str, text: str) -> None:
    if not _is_number(value):
        return  # absent (or None, e.g. no read timeout): no sample at all
    _header(lines, name, kind, text)
    lines.append(f"{PREFIX}{name} {_number(value)}")


def _sources(lines: list[str], status: dict) -> None:
    """Per-source counters. status["source_errors"] (name -> errors) is the
    stable part; the loader's source list adds requests, bytes and retries."""
    per_source: dict[str, dict[str, float]] = {}
    for entry in (status.get("loader") or {}).get("sources") or []:
        if isinstance(entry, dict) and "name" in entry:
            per_source[str(entry["name"])] = {k: entry[k] for k, _, _ in SOURCE_COUNTERS
                                              if _is_number(entry.get(k))}
    for name, errors in (status.get("source_errors") or {}).items():
        if _is_number(errors):
            per_source.setdefault(str(name), {})["errors"] = errors
    for key, metric, text in SOURCE_COUNTERS:
        samples = [(src, values[key]) for src, values in sorted(per_source.items())
                   if key in values]
        if not samples:
            continue
        _header(lines, metric, "counter", text)
        for src, value in samples:
            lines.append(f'{PREFIX}{metric}{{source="{_label(src)}"}} {_number(value)}')


def _histogram(lines: list[str], name: str, text: str, h: dict) -> None:
    buckets = h.get("buckets") or []
    _header(lines, name, "histogram", text)
    for bound, count in buckets:
        le = "+Inf" if bound == "+Inf" or math.isinf(float(bound)) else _number(float(bound))
        lines.append(f'{PREFIX}{name}_bucket{{le="{le}"}} {_number(count)}')
    lines.append(f"{PREFIX}{name}_sum {_number(h.get('sum', 0.0))}")
    lines.append(f"{PREFIX}{name}_count {_number(h.get('count', 0))}")


def _info(lines: list[str], status: dict) -> None:
    """Strings (image path, signed, loader state) as labels of a constant 1,
    the usual Prometheus way to export them."""
    labels = {"image": status.get("image"), "signed": status.get("signed"),
              "pid": status.get("pid"), "loader_state": (status.get("loader") or {}).get("state")}
    shown = ",".join(f'{k}="{_label(_text(v))}"' for k, v in labels.items() if v is not None)
    _header(lines, "info", "gauge", "The mount's image and daemon, as labels.")
    lines.append(f"{PREFIX}info{{{shown}}} 1")


def _header(lines: list[str], name: str, kind: str, text: str) -> None:
    lines.append(f"# HELP {PREFIX}{name} {_help(text)}")
    lines.append(f"# TYPE {PREFIX}{name} {kind}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _help(text: str) -> str:
    # HELP escapes only backslash and newline (format 0.0.4)
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label(text: str) -> str:
    # label values escape backslash, double quote and newline; a path may hold any of them
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_names() -> Iterable[str]:
    """Every family name this module can emit (docs and tests use it)."""
    for table in (COUNTERS, GAUGES, LOADER_COUNTERS, SOURCE_COUNTERS):
        for _key, name, _text in table:
            yield PREFIX + name
    yield from (PREFIX + "complete", PREFIX + "miss_latency_seconds", PREFIX + "info")
