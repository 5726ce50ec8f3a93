"""A picture of which blocks are present: in the terminal (rich) or as PNG.

The data blocks of every regular file, in inode order (or of one file), are
laid end to end and cut into cells; each cell is coloured by the fraction
of its blocks that is present. Presence comes from the control socket's
PRESENCE request (run-length ranges, docs/protocol.md). The PNG is written
with zlib and struct: no imaging library needed.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

ABSENT_RGB = (60, 60, 60)
PRESENT_RGB = (40, 200, 80)
PARTIAL_RGB = (230, 180, 40)


@dataclass
class Presence:
    """Present blocks of a sequence of files, as one run of blocks."""

    what: str  # "image" or the file's path
    total: int  # data blocks in all
    ranges: list[tuple[int, int]]  # [start, end) in the joined run, sorted

    @property
    def present(self) -> int:
        return sum(e - s for s, e in self.ranges)

    @classmethod
    def of_files(cls, what: str, files: list[dict]) -> "Presence":
        total, ranges = 0, []
        for f in files:
            ranges += [(total + s, total + e) for s, e in f["data"]]
            total += f["blocks"]
        return cls(what, total, ranges)

    def cells(self, n: int) -> list[float]:
        """Fractions present of `n` equal runs of blocks (fewer if there
        are fewer blocks). Cell i holds blocks [i*T//n, (i+1)*T//n)."""
        n = min(n, self.total)
        if n <= 0:
            return []
        present = [0] * n
        for start, end in self.ranges:
            cell = start * n // self.total
            while start < end:
                cell_end = _cell_start(cell + 1, n, self.total)
                upto = min(end, cell_end)
                present[cell] += upto - start
                start, cell = upto, cell + 1
        return [p / (_cell_start(i + 1, n, self.total) - _cell_start(i, n, self.total))
                for i, p in enumerate(present)]


def _cell_start(i: int, n: int, total: int) -> int:
    # ceil(i*total/n): the first block b with b*n//total >= i
    return -(-i * total // n)


# --- where presence comes from ------------------------------------------------

def query(mountpoint: str, path: str | None = None) -> Presence:
    """Presence of the whole image, or of `path` (inside the mount, or
    relative to it), asked over the mount's control socket."""
    from .control import Client

    with Client.connect(mountpoint) as c:
        if not path:
            return Presence.of_files("image", c.presence_all())
        files, _ = c.presence(ino=_inode_of(mountpoint, path))
        return Presence.of_files(path, files)


def _inode_of(mountpoint: str, path: str) -> int:
    """The incfs inode of a file: the mount reports it as st_ino."""
    target = Path(path) if os.path.isabs(path) else Path(mountpoint) / path
    try:
        st, mnt = os.stat(target), os.stat(mountpoint)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if st.st_dev != mnt.st_dev:
        raise UsageError(f"{path} is not inside the mount {mountpoint}")
    return st.st_ino


# --- drawing --------------------------------------------------------------------

def _rgb(fraction: float) -> tuple[int, int, int]:
    if fraction >= 1.0:
        return PRESENT_RGB
    if fraction <= 0.0:
        return ABSENT_RGB
    return PARTIAL_RGB


def terminal(p: Presence, width: int = 64, rows: int = 16):
    """A rich renderable: a header line and a grid of cells, one character
    each (full, partial or absent), at most width x rows cells."""
    from rich.text import Text

    pct = 100.0 * p.present / p.total if p.total else 100.0
    out = Text(f"{p.what}: {p.present}/{p.total} data blocks present ({pct:.1f}%)\n")
    cells = p.cells(width * rows)
    for i, fraction in enumerate(cells):
        out.append(*_glyph(fraction))
        if (i + 1) % width == 0 and i + 1 < len(cells):
            out.append("\n")
    per_cell = -(-p.total // len(cells)) if cells else 0
    out.append("\n")
    for fraction, name in ((1.0, "present  "), (0.5, "partly  "), (0.0, "absent")):
        out.append(*_glyph(fraction))
        out.append(" " + name)
    out.append("   (a cell is one block)" if per_cell == 1 else
               f"   (a cell is up to {per_cell} blocks)")
    return out


def _glyph(fraction: float) -> tuple[str, str]:
    """A character and a colour per cell: the shape alone still tells them
    apart when the output is not a colour terminal (a pipe, a log)."""
    char = "█" if fraction >= 1.0 else "·" if fraction <= 0.0 else "▒"
    return char, "rgb({},{},{})".format(*_rgb(fraction))


def png_bytes(p: Presence, max_side: int = 256, min_pixels: int = 256) -> bytes:
    """The same picture as a PNG: at most max_side x max_side cells in a
    near-square grid, each drawn as a square of pixels so that the picture
    is at least `min_pixels` wide; partly present cells are shaded by their
    fraction (the terminal has three colours, a file can say more). Cells
    past the last block are white."""
    cells = p.cells(max_side * max_side) or [1.0]
    width = min(max_side, math.isqrt(len(cells) - 1) + 1)
    height = -(-len(cells) // width)
    scale = max(1, min_pixels // width)
    pixel_rows = []
    for r in range(height):
        line = bytearray()
        for c in range(width):
            i = r * width + c
            rgb = _shade(cells[i]) if i < len(cells) else (255, 255, 255)
            line += bytes(rgb) * scale
        pixel_rows += [b"\x00" + bytes(line)] * scale  # filter type 0 per row
    return _png(width * scale, height * scale, b"".join(pixel_rows))


def _shade(fraction: float) -> tuple[int, int, int]:
    if fraction <= 0.0 or fraction >= 1.0:
        return _rgb(fraction)
    # partial: from the partial colour towards present as the cell fills
    return tuple(round(a + (b - a) * fraction) for a, b in zip(PARTIAL_RGB, PRESENT_RGB))


def _png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(p: Presence, path: str | os.PathLike) -> None:
    Path(path).write_bytes(png_bytes(p))
