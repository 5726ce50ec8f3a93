"""Prefetch profiles: which blocks a program read first, recorded on one run
and replayed on the next (R8).

A profile is JSON, the format `incfs pack --profile` reads (pack.load_profile):

    {"version": 1, "blocks": [["dir/file", block_index], ...]}

in first-read order, paths relative to the image root. `record` builds one
from a live mount's read log (a bounded ring of recent block reads, so a
very long run keeps only its last READ_LOG_SIZE reads); `resolve` turns one
back into (inode, block) pairs of an open image for the loader to fetch first.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from . import ROOT_INO

PROFILE_VERSION = 1


def record(mountpoint: str | os.PathLike, out_file: str | os.PathLike) -> int:
    """Write the profile of what has been read on `mountpoint` so far to
    `out_file`; returns the number of blocks in it."""
    from .control.client import Client

    with Client.connect(mountpoint) as client:
        entries = client.read_log()
    order: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for _serial, ino, index, _time in sorted(entries):
        key = (int(ino), int(index))
        if key not in seen:
            seen.add(key)
            order.append(key)
    paths = paths_of(mountpoint, {ino for ino, _ in order})
    blocks = [[paths[ino], index] for ino, index in order if ino in paths]
    write_profile(out_file, blocks)
    return len(blocks)


def paths_of(mountpoint: str | os.PathLike, inodes: set[int]) -> dict[int, str]:
    """Relative path of each wanted inode, found by walking the mount (its
    st_ino are incfs inode numbers); a hard-linked file gets its first name."""
    found: dict[int, str] = {}
    wanted = set(inodes)
    root = os.fspath(mountpoint)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_ino in wanted and st.st_ino not in found:
                found[st.st_ino] = os.path.relpath(full, root).replace(os.sep, "/")
        if len(found) == len(wanted):
            break
    return found


def write_profile(out_file: str | os.PathLike, blocks: list[list]) -> None:
    """Write atomically (temporary file, then rename)."""
    out = Path(out_file)
    text = json.dumps({"version": PROFILE_VERSION, "blocks": blocks})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve(image, profile_file: str | os.PathLike) -> list[tuple[int, int]]:
    """(inode, data block index) for each profile entry that names a block of
    a regular file in `image`, in profile order, without repeats."""
    from .pack import load_profile

    entries = load_profile(profile_file)
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    cache: dict[str, int | None] = {}
    for path, index in entries:
        if path not in cache:
            cache[path] = _lookup(image, path)
        ino = cache[path]
        if ino is None:
            continue
        node = image.ns.inodes[ino]
        if not 0 <= index < node.data.count or (ino, index) in seen:
            continue
        seen.add((ino, index))
        out.append((ino, index))
    return out


def _lookup(image, path: str) -> int | None:
    ino = ROOT_INO
    for part in os.fsencode(path).split(b"/"):
        if not part:
            continue
        node = image.ns.inodes.get(ino)
        if node is None or not node.is_dir or part not in node.children:
            return None
        ino = node.children[part]
    node = image.ns.inodes.get(ino)
    if node is None or node.data is None:
        return None
    return ino


__all__ = ["record", "resolve", "paths_of", "write_profile"]
