"""Which inodes of one mounted file system some process has open or mapped.

A daemon that takes over a FUSE connection (see supervisor.py) does not know
what its predecessor answered: which inodes were opened in cached mode and
which in passthrough mode. The kernel refuses an open in one mode while an
inode has opens in the other, so the new daemon asks /proc: an open file
shows in /proc/PID/fdinfo (its mount id and inode number), a mapping in
/proc/PID/maps (device and inode). Only /proc is read: nothing here touches
the FUSE mount itself, whose daemon may be the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

from .kmount import mounts


def open_inodes(major: int, minor: int) -> set[int]:
    """Inode numbers on device major:minor that any process (that we may look
    at: root sees all) has open or mapped."""
    found: set[int] = set()
    mount_ids_by_ns: dict[str, set[int]] = {}
    for pid in _pids():
        try:
            ids = _mount_ids(pid, major, minor, mount_ids_by_ns)
            found.update(_fd_inodes(pid, ids))
            found.update(_mapped_inodes(pid, major, minor))
        except OSError:
            continue  # the process ended, or is not ours to look at
    return found


def _pids() -> list[str]:
    return [name for name in os.listdir("/proc") if name.isdigit()]


def _mount_ids(pid: str, major: int, minor: int, cache: dict[str, set[int]]) -> set[int]:
    """The ids of the mounts of that device in the process's mount namespace
    (a copy in another namespace has other ids, the same device)."""
    ns = os.readlink(f"/proc/{pid}/ns/mnt")
    if ns not in cache:
        cache[ns] = {e.mount_id for e in mounts(pid) if (e.major, e.minor) == (major, minor)}
    return cache[ns]


def _fd_inodes(pid: str, mount_ids: set[int]) -> set[int]:
    if not mount_ids:
        return set()
    out = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if int(fields.get("mnt_id", "-1")) in mount_ids and "ino" in fields:
            out.add(int(fields["ino"]))
    return out


def _mapped_inodes(pid: str, major: int, minor: int) -> set[int]:
    want = f"{major:02x}:{minor:02x}"
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and fields[3] == want:
                out.add(int(fields[4]))
    return out
