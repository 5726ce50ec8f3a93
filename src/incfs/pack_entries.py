"""A directory input's hard-linked entries as pack holds them until the walk
meets their first name (a tar's or OCI's are records in `inputs.tree`): a
plain entry (no symlink target, extended attributes, metadata or file id;
already checked, so no origin is needed for messages) becomes 36 bytes in
one bytes object (69 with its header) instead of an Entry and its int
objects (about 200 bytes)."""

from __future__ import annotations

import struct

from .inputs import Entry

_PLAIN = struct.Struct("<IIIqQQ")  # mode, uid, gid, mtime_ns, size, rdev


def compact(e: Entry) -> Entry | bytes:
    """`e` as the tree keeps it: bytes when nothing is lost, else `e` itself."""
    if e.target or e.xattrs or e.metadata or e.file_id is not None or e.link is not None:
        return e
    try:
        return _PLAIN.pack(e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.rdev)
    except struct.error:  # a time or size out of the struct's range: keep it whole
        return e


def expand(kept: Entry | bytes) -> Entry:
    if isinstance(kept, Entry):
        return kept
    mode, uid, gid, mtime_ns, size, rdev = _PLAIN.unpack(kept)
    return Entry(b"", mode, uid, gid, mtime_ns, size, rdev)
