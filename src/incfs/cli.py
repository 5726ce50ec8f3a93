"""The `incfs` command line: a thin layer of argument parsing and printing
over the library (`pack`, `verify`, `integrity.signing`).

Every command is a plain function registered on the `main` group, so more
(mount, umount, status, serve, profile) can be added the same way. Errors
never show a traceback: `IncfsGroup.main` turns them into one line on stderr
and an exit code:

    0  success
    1  integrity failure (damaged, tampered with or incomplete image)
    2  usage or I/O error (bad argument, missing file, not an image, ...)
    3  internal error (a bug; set INCFS_DEBUG=1 to see the traceback)
  130  interrupted
  141  stdout was closed early (as with SIGPIPE)
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__, startup
from .errors import CorruptImage, IncfsError, IntegrityError

EXIT_OK, EXIT_INTEGRITY, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other tools in a pipeline


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> None:
    click.echo(f"incfs: error: {_one_line(message)}", err=True)
    sys.exit(code)


def _os_error_text(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.filename is not None:
        text += f": {os.fsdecode(e.filename)}"
        if e.filename2 is not None:
            text += f" -> {os.fsdecode(e.filename2)}"
    return text


class IncfsGroup(click.Group):
    """A click group whose errors are one line on stderr, never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        try:
            startup.take_interrupts()  # (a ^C the warm process held back: "interrupted")
            rv = super().main(args, prog_name or "incfs", complete_var,
                              standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            _fail(f"missing command (see '{e.ctx.command_path} --help')", EXIT_USAGE)
        except click.ClickException as e:
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            _fail(e.format_message() + hint, EXIT_USAGE)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", EXIT_INTERRUPTED)
        except (IntegrityError, CorruptImage) as e:
            _fail(str(e), EXIT_INTEGRITY)
        except IncfsError as e:
            _fail(str(e), EXIT_USAGE)
        except BrokenPipeError:  # stdout closed early (`incfs inspect | head`): quietly stop
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except OSError as e:
            _fail(_os_error_text(e), EXIT_USAGE)
        except Exception as e:  # a bug: say so in one line
            if os.environ.get("INCFS_DEBUG"):
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


@click.group(cls=IncfsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="incfs")
def main() -> None:
    """incfs: a lazily loaded, read-only, integrity-verified file system."""
    if click.get_current_context().invoked_subcommand != "mount":
        startup.imports_done()  # a mount's daemon does, once it has imported what it serves with


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


# --- keygen --------------------------------------------------------------------

@main.command("keygen")
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--algorithm", type=click.Choice(["ed25519", "ecdsa-p256", "rsa"]),
              default="ed25519", show_default=True, help="Signature algorithm.")
def keygen_cmd(key: Path, algorithm: str) -> None:
    """Create a signing key pair: KEY (private, mode 0600) and KEY.pub."""
    from .integrity import signing
    private, public = signing.write_keypair(key, signing.ALGORITHM_NAMES[algorithm])
    key_id = signing.key_id(signing.load_public(public)).hex()
    click.echo(f"wrote {private} (private, 0600) and {public} ({algorithm}, key id {key_id})")


# --- pack ----------------------------------------------------------------------

def _source_bytes(src: Path) -> int:
    """Bytes of regular files under `src`, hard links once: the progress total."""
    total, seen = 0, set()
    stack = [src]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@main.command("pack")
@click.argument("src")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--compress", type=click.Choice(["none", "lz4", "zstd"]), default="zstd",
              show_default=True, help="Per-block compression.")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Private key (from `incfs keygen`) to sign the image with.")
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="An older image whose identical blocks are reused as stored.")
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path),
              help="A read profile: its blocks are placed first in the data.")
@click.option("--max-entries", type=click.IntRange(min=1), default=None,
              help="Refuse archives with more entries than this (default 4,000,000).")
def pack_cmd(src: str, image: Path, compress: str, sign_key: Path | None,
             base: Path | None, profile: Path | None, max_entries: int | None) -> None:
    """Pack SRC into a new image IMAGE.

    SRC is a directory, a tar archive (plain, gzip, bzip2, xz or zstd), - for
    a tar stream on stdin, or oci:DIR[:TAG] for an OCI image layout.
    """
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    from . import pack as packing
    from .inputs import DEFAULT_MAX_ENTRIES
    from .verify import check_is_image

    if base is not None:
        check_is_image(base)  # a wrong --base is a usage error, not a damaged image
    console = _stderr_console()
    started = time.monotonic()
    src_dir = Path(src)
    show_bar = console.is_terminal and src != "-" and src_dir.is_dir()
    with Progress(TextColumn("packing"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  transient=True, disable=not show_bar) as bar:
        task = bar.add_task("pack", total=_source_bytes(src_dir) if show_bar else None)
        stats = packing.pack(src, image, compress=compress, sign_key=sign_key, base=base,
                             profile=profile, max_entries=max_entries or DEFAULT_MAX_ENTRIES,
                             progress=(lambda n: bar.advance(task, n)) if show_bar else None)
    elapsed = time.monotonic() - started
    click.echo(_pack_summary(image, stats, compress, sign_key, elapsed))


def _n(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _pack_summary(image: Path, stats, compress: str, sign_key, elapsed: float) -> str:
    size = image.stat().st_size
    kinds = [_n(stats.files, "file"), _n(stats.directories, "directory", "directories"),
             _n(stats.symlinks, "symlink")]
    for count, word in ((stats.devices, "device"), (stats.fifos, "fifo"),
                        (stats.sockets, "socket"), (stats.hard_links, "extra hard link")):
        if count:
            kinds.append(_n(count, word))
    parts = [f"Packed {', '.join(kinds[:-1])} and {kinds[-1]} ({_human(stats.bytes_in)} of "
             f"file data) into {image} ({_human(size)}) in {elapsed:.1f} s."]
    if stats.with_xattrs:
        parts.append(f"{_n(stats.with_xattrs, 'entry', 'entries')} with extended attributes.")
    stored = _n(stats.blocks, "data block")
    details = []
    if stats.zero_blocks:
        details.append(f"{stats.zero_blocks} all-zero (no space)")
    if stats.dedup_blocks:
        details.append(f"{stats.dedup_blocks} deduplicated")
    if stats.base_reused:
        details.append(f"{stats.base_reused} reused from the base image")
    if details:
        stored += " (" + ", ".join(details) + ")"
    ratio = f", {100 * stats.bytes_stored / stats.bytes_in:.0f}% of the source" \
        if stats.bytes_in else ""
    parts.append(f"{stored}; stored {_human(stats.bytes_stored)} with {compress}{ratio}.")
    if sign_key is not None:
        from .integrity import signing
        key = signing.load_private(sign_key)
        alg = next(n for n, a in signing.ALGORITHM_NAMES.items()
                   if a == signing.algorithm_of(key))
        parts.append(f"Signed with {alg} key {signing.key_id(key.public_key()).hex()[:16]}.")
    else:
        parts.append("Not signed.")
    if stats.skipped:
        parts.append(f"Skipped or ignored {_n(len(stats.skipped), 'entry', 'entries')} "
                     f"(first: {stats.skipped[0]}).")
    return " ".join(parts)


# --- inspect -------------------------------------------------------------------

@main.command("inspect")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON object.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="List at most this many tree entries.")
def inspect_cmd(image: Path, as_json: bool, limit: int) -> None:
    """Describe IMAGE: superblock, contents, blocks, signature, recovery, tree."""
    from .verify import describe_image
    info = describe_image(image, max_entries=limit)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _print_description(info)


def _print_description(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    sb, counts, blocks = info["superblock"], info["counts"], info["blocks"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    flags = ", ".join(sb["flag_names"]) or "none"
    grid.add_row("Image", info["image"])
    grid.add_row("Format", f"incfs {info['format_version']}, {sb['block_size']}-byte blocks, "
                           f"{sb['hash_algorithm']}, flags: {flags}")
    grid.add_row("UUID", sb["uuid"])
    layout = (f"metadata {4096}..{sb['meta_end']}, data {sb['data_start']}..{sb['data_end']}, "
              f"packed size {sb['packed_size']}, " if "packed" in sb["flag_names"] else "")
    grid.add_row("Size", f"{layout}file {info['file_size']} bytes ({_human(info['file_size'])})")
    special = "".join(f", {counts[k]} {k}" for k in ("devices", "fifos", "sockets") if counts[k])
    xattrs = f", {counts['with_xattrs']} with extended attributes" if counts["with_xattrs"] else ""
    grid.add_row("Contents", f"{counts['files']} files, {counts['directories']} directories, "
                             f"{counts['symlinks']} symlinks{special} ({counts['inodes']} "
                             f"inodes, {info['entries_total']} names{xattrs}); "
                             f"{_human(info['file_bytes'])} of file data")
    state = "complete" if info["complete"] else \
        f"incomplete ({info['complete_files']} of {counts['files']} files complete)"
    grid.add_row("Blocks", f"{blocks['present']} / {blocks['total']} present "
                           f"(data {blocks['data_present']}/{blocks['data_total']}, "
                           f"hash {blocks['hash_present']}/{blocks['hash_total']}): {state}")
    mix = ", ".join(f"{k} {v['blocks']} ({_human(v['stored_bytes'])})"
                    for k, v in info["compression"].items() if v["blocks"])
    grid.add_row("Stored", f"{_human(info['stored_bytes'])}: {mix or 'no blocks'}")
    index = info["index"]
    if index:
        chunks = (f", checked in {index['chunks']} chunks of {index['chunk_size']} bytes"
                  if index["chunks"] else ", region CRCs checked at open")
        grid.add_row("Index", f"{index['inodes']} inodes in {_human(index['bytes'])}{chunks}; "
                              f"features: {', '.join(index['features']) or 'none'}")
    sig = info["signature"]
    if sig:
        match = "root matches the namespace" if sig["root_matches_namespace"] \
            else "ROOT DOES NOT MATCH the namespace"
        grid.add_row("Signature", f"{sig['algorithm']}, key id {sig['key_id']}; {match} "
                                  "(use `incfs verify --key` to check it)")
    else:
        grid.add_row("Signature", "unsigned")
    rec = info["recovery"]
    if rec["clean"]:
        recovery = f"clean: {rec['records']} records, log ends at {rec['log_end']}"
    else:
        recovery = (f"{rec['records']} good records; dropped {rec['dropped_bytes']} bytes "
                    f"{rec['dropped_reason']}")
    if rec["skipped_unknown_types"]:
        recovery += "; skipped unknown record types " + ", ".join(
            f"{t:#x}" for t in rec["skipped_unknown_types"])
    if rec["blocks_beyond_log"]:
        recovery += f"; {rec['blocks_beyond_log']} mapped blocks past the good log are absent"
    grid.add_row("Recovery", recovery)

    shown = len(info["tree"])
    title = f"Tree ({info['entries_total']} entries" + \
        (f", first {shown} shown)" if info["tree_truncated"] else ")")
    table = Table(title=title, title_justify="left", box=None, show_edge=False)
    for col, justify in (("type", "left"), ("mode", "left"), ("owner", "right"),
                         ("size", "right"), ("blocks", "right"), ("path", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for e in info["tree"]:
        blocks_col = f"{e['blocks_present']}/{e['blocks_total']}" if "blocks_total" in e else ""
        path = e["path"] + (f" -> {e['target']}" if "target" in e else "")
        if "xattrs" in e:
            path += " [" + ", ".join(e["xattrs"]) + "]"
        size = f"{e['rdev'][0]},{e['rdev'][1]}" if "rdev" in e else str(e["size"])
        table.add_row(e["type"], e["mode"], f"{e['uid']}:{e['gid']}", size, blocks_col, path)
    # Render into a string and write it with click, so a closed stdout is
    # handled like every other command's output.
    with console.capture() as captured:
        console.print(grid)
        console.print(table, markup=False)
    click.echo(captured.get(), nl=False)


# --- verify --------------------------------------------------------------------

@main.command("verify")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path),
              help="Public key (KEY.pub) the image must be signed with.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, image: Path, key: Path | None, as_json: bool) -> None:
    """Check every record, signature, hash-tree and data block of IMAGE.

    Exit status: 0 good, 1 integrity failure, 2 usage or I/O error.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .verify import verify_image

    console = _stderr_console()
    with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("verify", total=None)
        report = verify_image(image, public_key_path=key, allow_unsigned=key is None,
                              progress=lambda done, total: bar.update(task, completed=done,
                                                                      total=total))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"{problem.severity}: {problem}")
        if report.problems_omitted:
            click.echo(f"note: {report.problems_omitted} more findings not listed")
        click.echo(report.summary())
    if report.exit_code:
        what = "integrity check failed" if report.exit_code == EXIT_INTEGRITY \
            else "verification could not complete"
        click.echo(f"incfs: error: {image}: {what} ({report.integrity_failures} integrity "
                   f"problem(s), {report.io_errors} I/O error(s))", err=True)
    ctx.exit(report.exit_code)


# --- digest --------------------------------------------------------------------

@main.command("digest")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("path")
def digest_cmd(image: Path, path: str) -> None:
    """Print the fs-verity digest of PATH inside IMAGE as sha256:<hex>."""
    from .verify import digest_of
    click.echo(digest_of(image, path))


# Commands of a running mount (mount, umount, status, serve, profile).
from .cli_mount import register as _register_mount_commands  # noqa: E402

_register_mount_commands(main)

from .space.cli import register as _register_space_commands  # noqa: E402

_register_space_commands(main)


if __name__ == "__main__":
    startup.run(main)
