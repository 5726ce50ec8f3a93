"""Plain copies of complete files (passthrough's backing files), as a place
data blocks are read from once a RELEASED record moved them out of the image.

In memory such a block is "present" with a virtual offset PLAIN_BASE +
index * 4096 (no image is that large), so the read path needs one test per
extent to pick the file, and consecutive blocks still form one extent. The
plain copy is never trusted: every block read from it is checked against
the file's Merkle tree like one read from the image.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from .. import BLOCK_SIZE

PLAIN_BASE = 1 << 62


def plain_directory(image_path: Path) -> Path:
    """Beside the image when its directory is writable (a cache), else in the
    user's cache directory, one per image file."""
    image_path = Path(image_path).resolve()
    if os.access(image_path.parent, os.W_OK):
        return image_path.with_name(image_path.name + ".plain")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "incfs" / "plain"
    return base / hashlib.sha256(str(image_path).encode()).hexdigest()[:20]


def plain_name(file_id: bytes, ino: int) -> str:
    return f"{file_id.hex()}-{ino}"


def is_plain(offset: int) -> bool:
    return offset >= PLAIN_BASE


def plain_offset(index: int) -> int:
    return PLAIN_BASE + index * BLOCK_SIZE


class PlainFiles:
    """Read-only descriptors of the plain copies an image's blocks live in,
    opened on first use (reads run in several threads).

    A descriptor is closed only once no pread holds it: a plain copy found
    bad is forgotten (`forget`) while another thread may be reading it, and
    closed at once its number could be reused by the next open, so that
    read would get another file's bytes. The Merkle check would refuse them,
    but a read must not depend on that to read the right file."""

    def __init__(self, image_path: Path):
        self.image_path = Path(image_path)
        self._directory: Path | None = None
        self._fds: dict[int, int] = {}  # ino -> descriptor
        self._users: dict[int, int] = {}  # descriptor -> preads holding it
        self._retired: set[int] = set()  # forgotten, closed when its last pread ends
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = plain_directory(self.image_path)
        return self._directory

    def path(self, node) -> Path:
        return self.directory / plain_name(node.file_id, node.ino)

    def pread(self, node, length: int, offset: int) -> bytes:
        """Bytes of `node`'s plain copy; b"" when it cannot be read (the
        caller then finds the bytes cut short: a bad block, never zeros)."""
        fd = self._hold(node)
        if fd < 0:
            return b""
        try:
            return os.pread(fd, length, offset - PLAIN_BASE)
        except OSError:
            return b""
        finally:
            self._let_go(fd)

    def _hold(self, node) -> int:
        """The plain copy's descriptor (opened if need be), held until
        `_let_go`; -1 if it cannot be opened."""
        with self._lock:
            fd = self._fds.get(node.ino)
            if fd is None:
                try:
                    fd = os.open(self.path(node), os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return -1
                self._fds[node.ino] = fd
            self._users[fd] = self._users.get(fd, 0) + 1
            return fd

    def _let_go(self, fd: int) -> None:
        with self._lock:
            left = self._users.pop(fd) - 1
            if left:
                self._users[fd] = left
                return
            if fd not in self._retired:
                return
            self._retired.discard(fd)
        os.close(fd)

    def usable(self, node) -> bool:
        """The plain copy exists with the file's size and our owner (cheap:
        its contents are checked block by block when read)."""
        try:
            st = self.path(node).stat()
        except OSError:
            return False
        return st.st_size == node.size and st.st_uid == os.geteuid()

    def forget(self, ino: int) -> None:
        """Stop reading `ino`'s plain copy: its descriptor is closed now, or
        when the last pread holding it ends."""
        with self._lock:
            fds = [self._fds.pop(ino)] if ino in self._fds else []
            idle = self._retire(fds)
        for fd in idle:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            idle = self._retire(fds)
        for fd in idle:
            os.close(fd)

    def _retire(self, fds: list[int]) -> list[int]:
        """Of descriptors no longer looked up, those no pread holds (to close
        now); the rest are closed by their last `_let_go`. Under the lock."""
        self._retired.update(fd for fd in fds if fd in self._users)
        return [fd for fd in fds if fd not in self._users]
