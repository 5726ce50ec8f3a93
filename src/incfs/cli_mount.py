"""Command-line commands of a running mount: mount, umount, status, serve and
profile. Registered on the `incfs` group by `cli.py`; the work is done by
`mount`, `serve` and `profile`, this module only parses and prints."""

from __future__ import annotations

import json
import math
import time

import click

from . import startup
from .loader.config import DEFAULTS
from .statusfile import read_status

__all__ = ["format_status", "parse_timeout", "read_status", "register", "watch_status"]


def parse_timeout(value: str) -> float | None:
    if value.lower() in ("forever", "inf", "none"):
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise click.BadParameter("a number of seconds or 'forever'") from None
    if not seconds > 0 or math.isinf(seconds):
        raise click.BadParameter("must be a positive number of seconds or 'forever'")
    return seconds


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(s: dict) -> str:
    total = max(1, s["blocks_total"])
    pct = 100.0 * s["blocks_present"] / total
    lat = s.get("miss_latency", {})
    lines = [
        f"image        {s.get('image', '?')}  ({'signed' if s.get('signed') else 'unsigned'})",
        f"files        {s['files']}",
        f"blocks       {s['blocks_present']}/{s['blocks_total']} present ({pct:.1f}%)"
        + ("  complete" if s["complete"] else ""),
        f"read         {_human(s.get('bytes_read', 0))} by programs, "
        f"{s.get('reads', 0)} reads, {s.get('misses', 0)} blocks waited for",
        f"fetched      {_human(s.get('bytes_fetched', 0))}"
        f"  (reused {_human(s.get('bytes_reused', 0))}, filled by loaders {_human(s.get('bytes_filled', 0))})",
        f"pending      {s['pending_reads']} reads waiting; miss latency p50 "
        f"{lat.get('p50_ms', 0)} ms, p99 {lat.get('p99_ms', 0)} ms",
        f"errors       {s.get('timeouts', 0)} timeouts, {s.get('verify_failures', 0)} "
        f"verification failures, {s.get('read_errors', 0)} read errors",
    ]
    for name, count in sorted(s.get("source_errors", {}).items()):
        lines.append(f"source       {name}: {count} errors")
    lines += _read_error_lines(s)
    space = s.get("space")
    if space:
        lines.append(f"cache cap    {_human(space['allocated'])} of {_human(space['cache_size'])} "
                     f"on disk (peak {_human(space['allocated_peak'])}); "
                     f"{space['blocks_released']} blocks released, "
                     f"{space['blocks_refetched']} fetched again")
    return "\n".join(lines)


def _read_error_lines(s: dict) -> list[str]:
    """The last failed read and the per-uid read timeouts (when set)."""
    out = []
    e = s.get("last_read_error")
    if e:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time_ns"] / 1e9))
        out.append(f"last error   {e['error']} at {when}: inode {e['ino']} block {e['block']}"
                   f" (uid {e['uid']}): {e['why']}")
    timeouts = s.get("read_timeouts") or {}
    if timeouts:
        shown = ", ".join(f"uid {u}: {'forever' if t is None else f'{t:g} s'}"
                          for u, t in timeouts.items())
        out.append(f"timeouts     {shown} (others: {_bound(s.get('read_timeout'))})")
    return out


def _bound(seconds: float | None) -> str:
    return "forever" if seconds is None else f"{seconds:g} s"


def _metrics_listen_option(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    from .metrics_http import check_listen

    try:
        return check_listen(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    except OSError as e:
        raise click.BadParameter(f"cannot listen on {value}: {e.strerror or e}") from None


def _size_option(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    from .space.sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def register(main: click.Group) -> None:
    @main.command("mount")
    @click.argument("source")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    @click.option("--cache", type=click.Path(dir_okay=False),
                  help="Backing image to use or create (default: under ~/.cache/incfs).")
    @click.option("--key", type=click.Path(dir_okay=False, exists=True),
                  help="Public key the image must be signed with.")
    @click.option("--allow-unsigned", is_flag=True,
                  help="Mount an image without checking its signature.")
    @click.option("--read-timeout", default="forever", show_default=True,
                  help="Seconds a read waits for an absent block before ETIME, or 'forever'.")
    @click.option("--prefetch", default=DEFAULTS.prefetch, show_default=True,
                  help="Background fetching: none, sequential or profile:FILE.")
    @click.option("--mirror", "mirrors", multiple=True,
                  help="Another URL of the same image, tried in order after SOURCE (repeatable).")
    @click.option("--amplify", type=click.IntRange(min=4096), default=DEFAULTS.amplify,
                  show_default=True, help="Bytes a miss fetches around the block it needs.")
    @click.option("--max-inflight", type=click.IntRange(min=1), default=DEFAULTS.max_inflight,
                  show_default=True, help="Source requests in flight at once.")
    @click.option("--inflight-budget", type=click.IntRange(min=4096),
                  default=DEFAULTS.inflight_budget, show_default=True,
                  help="Bytes of source requests in flight at most (bounds the daemon's memory).")
    @click.option("--readahead-max", type=click.IntRange(min=4096),
                  default=DEFAULTS.readahead_max, show_default=True,
                  help="Largest readahead window of a sequential reader, in bytes.")
    @click.option("--bandwidth", type=click.FloatRange(min=1), default=DEFAULTS.bandwidth,
                  help="Cap background prefetch to this many bytes/s (reads are never capped).")
    @click.option("--base-cache", type=click.Path(dir_okay=False, exists=True),
                  help="An older image or cache whose identical blocks are copied, not fetched.")
    @click.option("--s3-endpoint", default=None, help="Custom S3 endpoint URL.")
    @click.option("--metrics-listen", default=None, metavar="HOST:PORT",
                  callback=_metrics_listen_option,
                  help="Serve Prometheus metrics over HTTP at /metrics (host defaults to 127.0.0.1).")
    @click.option("--cache-size", default=None, metavar="SIZE", callback=_size_option,
                  help="Cap the cache file's disk use (e.g. 32M, 2G; metadata and hash "
                       "trees included): least recently read data is given up first.")
    @click.option("--passthrough/--no-passthrough", default=True, show_default=True,
                  help="Let the kernel read complete files directly (root, FUSE passthrough).")
    @click.option("--devices", is_flag=True,
                  help="Let the image's device nodes work (root; default: nodev).")
    @click.option("--setuid", is_flag=True,
                  help="Honour setuid/setgid bits and file capabilities (root; default: nosuid).")
    @click.option("--owners", type=click.Choice(["auto", "stored", "mine"]), default="auto",
                  show_default=True,
                  help="File owners as stored in the image, or all the mounting user's "
                       "(auto: stored for root, mine otherwise).")
    @click.option("--foreground", is_flag=True, help="Run in the foreground until unmounted.")
    def mount_cmd(source, mountpoint, cache, key, allow_unsigned, read_timeout, prefetch,
                  mirrors, amplify, max_inflight, inflight_budget, readahead_max, bandwidth,
                  base_cache, s3_endpoint, metrics_listen, cache_size, passthrough, devices,
                  setuid, owners, foreground):
        """Mount SOURCE (an image path, http(s)://, s3://bucket/key, or 'empty')."""
        from .mount import MountConfig, mount_background, run_foreground

        if key and allow_unsigned:
            raise click.UsageError("--key and --allow-unsigned exclude each other")
        from .loader.config import check_prefetch

        check_prefetch(prefetch)
        config = MountConfig(source=source, mountpoint=mountpoint, cache=cache, key=key,
                             allow_unsigned=allow_unsigned,
                             read_timeout=parse_timeout(read_timeout), prefetch=prefetch,
                             mirrors=list(mirrors) or None, amplify=amplify,
                             max_inflight=max_inflight, inflight_budget=inflight_budget,
                             readahead_max=readahead_max, bandwidth=bandwidth,
                             base_cache=base_cache,
                             metrics_listen=metrics_listen, passthrough=passthrough,
                             devices=devices, setuid=setuid, owners=owners,
                             cache_size=cache_size,
                             source_options={"endpoint_url": s3_endpoint} if s3_endpoint else None)
        if foreground:
            raise SystemExit(run_foreground(config))
        from . import early_fork

        # this process runs no thread (see incfs.forked); its early child, if
        # the console script forked one, runs the mount's supervisor
        child = early_fork.take()
        mount_background(config, fork=True, early_child=child.run if child else None)
        from . import warm

        warm.leave_behind(main)  # for the next command, unless one is there (incfs.warm)
        click.echo(f"incfs: mounted {source} on {mountpoint}")
        startup.leave_at_once()

    @main.command("umount")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    def umount_cmd(mountpoint):
        """Unmount MOUNTPOINT and wait until the daemon has flushed its image."""
        from .mount import umount

        umount(mountpoint)

    @main.command("restart")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    @click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
                  help="Seconds to wait for the new daemon to serve.")
    def restart_cmd(mountpoint, timeout):
        """Replace the daemon of MOUNTPOINT by a new one (an upgrade in place).

        Programs using the mount see a pause, not an error: the FUSE connection
        is kept by the mount's supervisor, and requests the old daemon had not
        answered are sent again to the new one."""
        from .supervisor import restart_daemon

        old, new = restart_daemon(mountpoint, timeout)
        click.echo(f"incfs: {mountpoint}: daemon {old or '(starting)'} replaced by {new}")

    @main.command("status")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    @click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
    @click.option("--watch", is_flag=True, help="Show a live progress bar until complete.")
    @click.option("--map", "map_path", is_flag=False, flag_value="", default=None,
                  metavar="[PATH]",
                  help="Draw which data blocks of the image (or of file PATH) are present.")
    @click.option("--png", "png", type=click.Path(dir_okay=False), default=None,
                  help="Write the --map picture to FILE as PNG (the whole image without --map).")
    def status_cmd(mountpoint, as_json, watch, map_path, png):
        """Show what a mount holds, has fetched and is waiting for."""
        if map_path is not None or png:
            show_map(mountpoint, map_path, png)
            return
        if watch:
            watch_status(mountpoint)
            return
        s = read_status(mountpoint)
        click.echo(json.dumps(s, indent=2, sort_keys=True) if as_json else format_status(s))

    @main.command("metrics")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    def metrics_cmd(mountpoint):
        """Print MOUNTPOINT's counters as Prometheus text (format 0.0.4)."""
        from .metrics import render

        click.echo(render(read_status(mountpoint)), nl=False)

    @main.command("serve")
    @click.argument("image", type=click.Path(exists=True))
    @click.option("--port", type=int, default=8080, show_default=True)
    @click.option("--host", default="127.0.0.1", show_default=True)
    def serve_cmd(image, port, host):
        """Serve IMAGE over HTTP with Range support (for demos and tests)."""
        from .serve import run_server

        run_server(image, port, host)

    @main.command("handoff")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    @click.option("--erofs", "erofs_image", type=click.Path(dir_okay=False),
                  help="Where to write the EROFS image (default: beside the backing image).")
    def handoff_cmd(mountpoint, erofs_image):
        """Serve a complete mount from the kernel (EROFS, no user-space shim)."""
        from .native import handoff

        image = handoff(mountpoint, erofs_image)
        click.echo(f"incfs: {mountpoint} is now served by the kernel from {image}")

    @main.group("profile")
    def profile_group():
        """Record and use prefetch profiles."""

    @profile_group.command("record")
    @click.argument("mountpoint", type=click.Path(file_okay=False))
    @click.argument("file", type=click.Path(dir_okay=False))
    def profile_record_cmd(mountpoint, file):
        """Save the order in which blocks were first read on MOUNTPOINT."""
        from .profile import record

        count = record(mountpoint, file)
        click.echo(f"incfs: recorded {count} blocks to {file}")


def show_map(mountpoint: str, path: str | None, png: str | None) -> None:
    """`incfs status --map/--png`: the presence picture (see incfs.presence)."""
    from rich.console import Console

    from . import presence

    picture = presence.query(mountpoint, path)  # OSErrors say what is wrong in one line
    if png:
        presence.write_png(picture, png)
        click.echo(f"incfs: wrote {png}")
    if path is not None or not png:
        Console(highlight=False).print(presence.terminal(picture))


def watch_status(mountpoint: str, interval: float = 0.2) -> None:
    """A live progress bar of blocks present, until the image is complete."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    s = read_status(mountpoint)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TextColumn("{task.fields[extra]}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("incfs", total=s["blocks_total"] * 4096, extra="")
        while True:
            s = read_status(mountpoint)
            extra = f"fetched {_human(s.get('bytes_fetched', 0))}, {s['pending_reads']} waiting"
            bar.update(task, completed=s["blocks_present"] * 4096, extra=extra)
            if s["complete"]:
                break
            time.sleep(interval)
