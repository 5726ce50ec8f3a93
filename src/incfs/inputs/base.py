"""The one entry type every pack input yields, and helpers shared by them.

An input (a directory, a tar stream, an OCI layout) is an iterable of
`Entry` values. Paths are already checked: relative, no `.`/`..`, every part a
valid name, so nothing downstream can be led outside the image. A regular
file's `data` opens its content; for a tar stream it is valid only until the
next entry is taken, so pack reads it at once.
"""

from __future__ import annotations

import lzma
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Protocol, runtime_checkable

import zstandard

from ..errors import UsageError
from ..namespace import check_name

# Refuse archives with more entries than this (a "bomb" of tiny headers,
# which compress to almost nothing, would otherwise grow memory unbounded).
DEFAULT_MAX_ENTRIES = 4_000_000

# What reading a damaged or truncated archive can raise besides OSError.
# tarfile's own parsers let a few plain Python errors out on garbage (a cut
# gzip header gives TypeError from ord()); they are caught only around the
# calls that parse archive bytes.
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, OSError,
               ValueError, TypeError, IndexError, struct.error, lzma.LZMAError)


@dataclass(slots=True)
class Entry:
    path: bytes  # b"" for the root, else b"a/b/c"
    mode: int  # the whole st_mode
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  # regular files
    rdev: int = 0  # devices
    target: bytes = b""  # symlinks, stored as given (a target is just bytes)
    link: bytes | None = None  # a hard link: the path of an earlier entry
    xattrs: dict[bytes, bytes] | None = None
    data: Callable[[], BinaryIO] | None = None  # regular files: opens the content
    origin: str = ""  # where it came from, for messages
    # Kept from an image being compacted (other inputs leave them: pack then
    # derives the file id from the path, and there is no user metadata).
    metadata: bytes = b""
    file_id: bytes | None = None
    # A directory input's non-directory with other names (st_nlink > 1):
    # later entries may be hard links to it.
    shared: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


class Input(Protocol):
    notes: list[str]  # entries skipped or reinterpreted, for the pack summary

    def entries(self) -> Iterator[Entry]: ...

    def close(self) -> None: ...


@runtime_checkable
class ListedInput(Protocol):
    """An input that lists one directory at a time, names sorted, with no
    path given twice (a directory on disk): pack then walks it in inode order
    and keeps no tree. A hard link's `link` names an entry listed before it
    (in the order `entries()` yields them), which had `shared` set."""

    notes: list[str]

    def root_entry(self) -> Entry: ...

    def listing(self, rel: bytes) -> list[Entry]: ...

    def entries(self) -> Iterator[Entry]: ...

    def close(self) -> None: ...


def normalize(name: str | bytes, what: str) -> bytes:
    """An archive member name as a checked relative path (b"" is the root).
    Absolute names and `..` are refused rather than stripped: an archive
    that has them was not made for extraction in place, and guessing what it
    meant is how files end up outside the tree."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"/"):
        raise UsageError(f"{what}: absolute path {_show(raw)} in the archive")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    for part in parts:
        if part == b"..":
            raise UsageError(f"{what}: path {_show(raw)} leaves the archive (..)")
        try:
            check_name(part)
        except OSError as e:
            raise bad_name(raw, what, e) from None
    return b"/".join(parts)


def bad_name(raw: bytes, what: str, e: OSError) -> UsageError:
    return UsageError(f"{what}: bad name in {_show(raw)}: {e.strerror}")


def _show(raw: bytes) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 120 else text[:120] + "...")


class SafeReader:
    """A file object whose read errors (a truncated or damaged archive) come
    out as one UsageError naming the entry, never a traceback."""

    def __init__(self, f: BinaryIO, origin: str):
        self.f, self.origin = f, origin

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except READ_ERRORS as e:
            raise UsageError(f"cannot read {self.origin}: {_reason(e)}") from None

    def close(self) -> None:
        try:
            self.f.close()
        except READ_ERRORS:
            pass

    def __enter__(self) -> "SafeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def read_error(what: str, e: BaseException) -> UsageError:
    text = str(e).lower()
    if isinstance(e, EOFError) or any(w in text for w in ("end of data", "truncated",
                                                          "empty header")):
        return UsageError(f"{what}: truncated archive ({_reason(e)})")
    return UsageError(f"{what}: damaged archive ({_reason(e)})")


def check_id(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise UsageError(f"{what}: owner id {value} out of range")
    return value


def too_many(what: str, limit: int) -> UsageError:
    return UsageError(f"{what}: more than {limit} entries (raise --max-entries if this "
                      "archive is real)")


__all__ = ["Entry", "Input", "ListedInput", "normalize", "SafeReader", "READ_ERRORS"]
