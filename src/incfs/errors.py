"""Exceptions shared by every layer. Each one carries the errno a FUSE reply or
a control-protocol answer should use, so translating them is one line."""

from __future__ import annotations

import errno


class IncfsError(Exception):
    """Base of incfs's own errors; `errno` is what a syscall would report."""

    errno: int = errno.EIO


class CorruptImage(IncfsError):
    """The backing image is not readable as incfs, or a record is damaged."""

    errno = errno.EUCLEAN


class IntegrityError(IncfsError):
    """A block, tree block or signature does not match what the image signs."""

    errno = errno.EBADMSG


class BadBlock(IntegrityError):
    """One stored block (data or hash) failed its checksum or its Merkle
    check; names which, so a cache can forget it and fetch it again."""

    def __init__(self, ino: int, tree: int, index: int, message: str):
        super().__init__(message)
        self.ino, self.tree, self.index = ino, int(tree), index


class UsageError(IncfsError):
    """The caller asked for something that cannot be done (bad argument)."""

    errno = errno.EINVAL


def os_error(code: int, message: str = "") -> OSError:
    """An OSError with a proper errno and the system's message for it."""
    import os

    text = os.strerror(code) + (f": {message}" if message else "")
    return OSError(code, text)
