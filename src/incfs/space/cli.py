"""`incfs gc CACHE` and `incfs compact IMAGE [OUT]` (offline)."""

from __future__ import annotations

from pathlib import Path

import click


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def register(main: click.Group) -> None:
    @main.command("gc")
    @click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    def gc_cmd(image: Path) -> None:
        """Give back the space of dead data in IMAGE (a cache, not mounted):
        files no name reaches, and stored bytes no block map names."""
        from ..image import Image  # here: every `incfs` command would pay ~50 ms for it
        from .gc import collect

        with Image.open(image, writable=True) as img:
            result = collect(img, unlinked=True)
        click.echo(f"incfs: gc {image}: {_mib(result.allocated_before)} -> "
                   f"{_mib(result.allocated_after)} on disk ({result.unlinked_files} nameless "
                   f"files, {result.blocks_released} blocks released, "
                   f"{_mib(result.dead_bytes)} of payload no block map names)")

    @main.command("compact")
    @click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.argument("out", required=False, type=click.Path(dir_okay=False, path_type=Path))
    def compact_cmd(image: Path, out: Path | None) -> None:
        """Rewrite IMAGE without dead space, in place or as OUT (crash-safe:
        a new file, fsynced, then renamed)."""
        from .compact import compact

        result = compact(image, out)
        click.echo(f"incfs: compact {image} -> {out or image}: {_mib(result.size_before)} -> "
                   f"{_mib(result.size_after)} on disk, {result.blocks_copied} blocks copied, "
                   f"{result.blocks_bad} bad blocks left out, {result.inodes_dropped} nameless "
                   f"inodes dropped, signature {result.signature}")
