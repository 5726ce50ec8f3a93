#!/usr/bin/env python3
"""Write the tree of `incfs.testing.smalltree` (DIRS directories of 1,000
files, every hundredth holding one line, the rest empty) as a ustar stream,
without making it on disk: what `tar -C TREE -cf - .` gives for that tree,
names and contents alike, so a pack of millions of files needs no tree.

    python bench/tarstream.py DIRS > tree.tar
    python bench/tarstream.py DIRS | incfs pack - tree.img

Headers are filled into a template (one name and one checksum each): about
2 µs an entry, so the writer keeps well ahead of pack on a second core.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO

FILES_PER_DIR = 1000
BLOCK = 512


def _template(mode: int, kind: bytes, mtime: int) -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"%07o\0" % mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % 0
    header[136:148] = b"%011o\0" % mtime
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[265:269] = b"root"
    header[297:301] = b"root"
    return header


def _header(template: bytearray, name: bytes, size: int) -> bytes:
    header = bytearray(template)
    header[0:len(name)] = name
    if size:
        header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum counts itself as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def write_tree(out: BinaryIO, dirs: int, mtime: int | None = None) -> int:
    """Write the archive to `out`; returns its length in bytes."""
    mtime = int(time.time()) if mtime is None else mtime
    directory = _template(0o40755, b"5", mtime)
    regular = _template(0o100644, b"0", mtime)
    written = 0
    chunk: list[bytes] = [_header(directory, b"./", 0)]
    for d in range(dirs):
        top = b"./d%03d" % d
        chunk.append(_header(directory, top + b"/", 0))
        for i in range(FILES_PER_DIR):
            name = b"%s/f%03d" % (top, i)
            if i % 100 == 0:
                data = b"file %d/%d\n" % (d, i)
                chunk.append(_header(regular, name, len(data)))
                chunk.append(data.ljust(BLOCK, b"\0"))
            else:
                chunk.append(_header(regular, name, 0))
        block = b"".join(chunk)
        out.write(block)
        written += len(block)
        chunk = []
    end = bytes(20 * BLOCK)  # two zero blocks, padded to tar's 10 KiB record
    end = end[:(-(written + 2 * BLOCK)) % 10240 + 2 * BLOCK]
    out.write(end)
    return written + len(end)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: tarstream.py DIRS > archive.tar")
    write_tree(sys.stdout.buffer, int(sys.argv[1]))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
