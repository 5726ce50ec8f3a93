"""A minimal inotify watcher over ctypes (inotify_simple is not installed):
enough for tests to see what the kernel reports for a FUSE mount."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct

IN_ATTRIB = 0x4
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_DONT_FOLLOW = 0x02000000
EVENT = struct.Struct("iIII")  # wd mask cookie len, then the name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Watcher:
    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}

    def watch(self, path: str | os.PathLike, mask: int) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_add_watch({path}): {os.strerror(e)}")
        self.paths[wd] = os.fspath(path)
        return wd

    def events(self, timeout: float) -> list[tuple[int, int, bytes]]:
        """(wd, mask, name) of the events that arrive within `timeout`
        seconds of the first poll (all that are queued, once one is)."""
        out: list[tuple[int, int, bytes]] = []
        if not select.select([self.fd], [], [], timeout)[0]:
            return out
        while True:
            try:
                raw = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(raw):
                wd, mask, _cookie, length = EVENT.unpack_from(raw, pos)
                name = raw[pos + EVENT.size:pos + EVENT.size + length].rstrip(b"\0")
                out.append((wd, mask, name))
                pos += EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
