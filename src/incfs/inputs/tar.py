"""A tar archive (plain, gzip, bzip2, xz or zstd; ustar, GNU and PAX) or a tar
stream on stdin as pack input, read once, front to back, in tarfile's
streaming mode: nothing is extracted and memory does not grow with the
archive's data.

What is kept: names (long GNU and PAX names too), the whole mode, numeric
owner ids (user and group names are ignored, like `tar --numeric-owner`),
mtime (PAX's to the nanosecond), symlink targets as given, hard links,
character and block devices, fifos, and extended attributes from PAX
`SCHILY.xattr.NAME` (GNU tar, star, bsdtar) and `LIBARCHIVE.xattr.NAME`
(base64) records, and text ACLs (`SCHILY.acl.access`/`.default`, GNU tar
`--acls`) turned into the `system.posix_acl_*` values the kernel keeps. Other entry types (GNU volume labels, ...) are skipped
and listed in the pack summary.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import struct
import tarfile
import urllib.parse
from typing import BinaryIO, Iterator

import zstandard

from ..errors import UsageError
from ..namespace import check_name
from . import tar_header
from .base import (DEFAULT_MAX_ENTRIES, READ_ERRORS, Entry, SafeReader, bad_name, check_id,
                   normalize, read_error, too_many)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TYPES = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
          tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
          tarfile.FIFOTYPE: stat.S_IFIFO}


class _Prefixed(io.RawIOBase):
    """Bytes already read from a stream (to sniff its compression), then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.rest.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.rest.read(n)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def open_stream(raw: BinaryIO) -> BinaryIO:
    """`raw` with zstd undone (tarfile itself undoes gzip, bzip2 and xz)."""
    head = raw.read(4)
    stream: BinaryIO = _Prefixed(head, raw)
    if head == ZSTD_MAGIC:
        stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


# tarfile reads a PAX or GNU long-name header's data whole and follows a
# chain of them by recursion: bound both, or a few compressed bytes of
# hostile archive cost gigabytes or a RecursionError.
MAX_HEADER_DATA = 8 << 20  # room for 1 MiB of xattrs, PAX-encoded, and long names
MAX_HEADER_CHAIN = 32


class _Bound(tarfile.ReadError):
    """A header over our bounds: the archive is hostile or broken, not "not a tar"."""


class _TarInfo(tarfile.TarInfo):
    """Records why tarfile stopped (it ends quietly on a cut-off or garbled
    header after the first, which would make a truncated archive look
    whole), and bounds the headers it reads."""

    @classmethod
    def fromtarfile(cls, tf):
        depth = getattr(tf, "incfs_depth", 0) + 1
        if depth > MAX_HEADER_CHAIN:
            raise _Bound(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
        tf.incfs_depth = depth
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.incfs_stop = e
            raise
        finally:
            tf.incfs_depth = depth - 1

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        return tar_header.frombuf(cls, buf, encoding, errors)

    def _proc_pax(self, tf):
        self._bound()
        return super()._proc_pax(tf)

    def _proc_gnulong(self, tf):
        self._bound()
        return super()._proc_gnulong(tf)

    def _bound(self) -> None:
        if self.size > MAX_HEADER_DATA:
            raise _Bound(f"an extended header of {self.size} bytes (the limit is "
                         f"{MAX_HEADER_DATA})")


def _check_end(name: str, tf: tarfile.TarFile) -> None:
    stop = getattr(tf, "incfs_stop", None)
    if isinstance(stop, tarfile.EOFHeaderError):
        return  # the end-of-archive zero block
    if isinstance(stop, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        raise UsageError(f"{name}: truncated archive (it ends without the end-of-archive "
                         "marker)")
    raise UsageError(f"{name}: damaged archive ({stop or 'bad header'} at offset {tf.offset})")


class TarInput:
    def __init__(self, name: str, opener, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.name = name  # for messages: the archive's path or "stdin"
        self.opener = opener  # returns the raw (maybe compressed) byte stream
        self.max_entries = max_entries
        self.notes: list[str] = []
        self._raw: BinaryIO | None = None
        # the last member's directory, as named and as checked: an archive
        # lists a directory's entries together, so most names need only
        # their last part checked
        self._dir_raw: bytes | None = None
        self._dir = b""

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kw) -> "TarInput":
        def opener() -> BinaryIO:
            try:
                return open(path, "rb")
            except OSError as e:
                raise UsageError(f"cannot open {path}: {e.strerror}") from None
        return cls(str(path), opener, **kw)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def entries(self) -> Iterator[Entry]:
        for _member, entry in self.members():
            if entry is not None:
                yield entry

    def members(self) -> Iterator[tuple[tarfile.TarInfo, Entry | None]]:
        """Every member with its entry (None for one that is skipped); the
        entry's `data` is valid until the next member is taken."""
        self._raw = self.opener()
        try:
            tf = tarfile.open(fileobj=open_stream(self._raw), mode="r|*", tarinfo=_TarInfo,
                              encoding="utf-8", errors="surrogateescape")
        except _Bound as e:
            raise UsageError(f"{self.name}: refused: {e}") from None
        except READ_ERRORS as e:
            raise _not_tar(self.name, e) from None
        count = 0
        while True:
            try:
                member = tf.next()
            except _Bound as e:
                raise UsageError(f"{self.name}: refused: {e}") from None
            except READ_ERRORS as e:
                raise read_error(self.name, e) from None
            if member is None:
                _check_end(self.name, tf)
                return
            tf.members.clear()  # tarfile keeps every member otherwise
            count += 1
            if count > self.max_entries:
                raise too_many(self.name, self.max_entries)
            yield member, self._entry(tf, member)

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> Entry | None:
        origin = f"{self.name}: {m.name}"
        path = self._normalize(m.name, origin)
        xattrs = pax_acls(m.pax_headers, origin, self.notes)
        xattrs.update(pax_xattrs(m.pax_headers, origin))  # raw values win over text ACLs
        e = Entry(path, 0, check_id(m.uid, origin), check_id(m.gid, origin),
                  _mtime_ns(m, origin), xattrs=xattrs or None, origin=origin)
        perm = m.mode & 0o7777
        if m.islnk():
            e.link = normalize(m.linkname, origin)
        elif m.isreg():  # also contiguous files and GNU sparse files
            e.mode, e.size = stat.S_IFREG | perm, m.size
            e.data = lambda: SafeReader(tf.extractfile(m), origin)
        elif m.type in _TYPES:
            e.mode = _TYPES[m.type] | (0o777 if m.issym() else perm)
            if m.issym():
                e.target = m.linkname.encode("utf-8", "surrogateescape")
                e.size = len(e.target)
            elif m.ischr() or m.isblk():
                e.rdev = _rdev(m, origin)
        else:
            self.notes.append(f"{origin}: tar entry type {m.type!r} is not a file")
            return None
        return e


    def _normalize(self, name: str, origin: str) -> bytes:
        """`normalize(name, origin)`, checking only the last part when the
        directory is the last member's."""
        raw = name.encode("utf-8", "surrogateescape")
        up, _, last = raw.rpartition(b"/")
        if up != self._dir_raw or last in (b"", b".", b"..") or raw.startswith(b"/"):
            path = normalize(raw, origin)
            self._dir_raw, self._dir = up, normalize(up, origin)
            return path
        try:
            check_name(last)
        except OSError as e:
            raise bad_name(raw, origin, e) from None
        return self._dir + b"/" + last if self._dir else last


def _not_tar(name: str, e: BaseException) -> UsageError:
    return UsageError(f"{name} is not a directory or a tar archive (plain, gzip, bzip2, xz "
                      f"or zstd): {e}")


def _rdev(m: tarfile.TarInfo, origin: str) -> int:
    # base-256 header fields can hold any number; dev_t cannot
    if not (0 <= m.devmajor <= 0xFFFFFFFF and 0 <= m.devminor <= 0xFFFFFFFF):
        raise UsageError(f"{origin}: device number {m.devmajor},{m.devminor} out of range")
    return os.makedev(m.devmajor, m.devminor)


def _mtime_ns(m: tarfile.TarInfo, origin: str) -> int:
    """PAX keeps the exact decimal string; a float would lose nanoseconds."""
    text = m.pax_headers.get("mtime")
    ns = None
    if text:
        try:
            ns = _decimal_ns(text)
        except ValueError:
            pass
    if ns is None:
        try:
            ns = int(m.mtime) * 1_000_000_000
        except (ValueError, OverflowError, TypeError):
            raise UsageError(f"{origin}: bad modification time {m.mtime!r}") from None
    if not -(1 << 63) <= ns < (1 << 63):
        raise UsageError(f"{origin}: modification time out of range")
    return ns


def _decimal_ns(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9]))


def pax_xattrs(pax: dict[str, str], origin: str) -> dict[bytes, bytes]:
    """Extended attributes from PAX records. tarfile hands values over as text
    decoded with surrogateescape, so encoding them back gives the bytes."""
    out = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            out[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                out[name] = base64.b64decode(value.encode("ascii", "surrogateescape")
                                             + b"===")
            except (binascii.Error, ValueError):
                raise UsageError(f"{origin}: bad LIBARCHIVE.xattr value for {name!r}") from None
    return out


# POSIX ACLs in the kernel's xattr form (include/uapi/linux/posix_acl_xattr.h)
ACL_VERSION = 2
ACL_TAGS = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10),
            "other": (0x20, 0x20)}  # (without qualifier, with qualifier)
ACL_ABBREV = {"u": "user", "g": "group", "m": "mask", "o": "other"}
ACL_NO_ID = 0xFFFFFFFF
_ACL_RECORDS = {"SCHILY.acl.access": b"system.posix_acl_access",
                "SCHILY.acl.default": b"system.posix_acl_default"}


def pax_acls(pax: dict[str, str], origin: str, notes: list[str]) -> dict[bytes, bytes]:
    """GNU tar `--acls` and star store ACLs as text (SCHILY.acl.access and
    .default); turn them into the binary xattr values the kernel keeps, so
    they match what a directory input reads. An entry that names a user or
    group without a numeric id cannot be mapped here (the image's names are
    not this machine's): that ACL is left out and noted."""
    out = {}
    for key, xattr in _ACL_RECORDS.items():
        text = pax.get(key)
        if not text:
            continue
        try:
            entries = _parse_acl(text)
        except ValueError as e:
            notes.append(f"{origin}: {key} not kept ({e})")
            continue
        minimal = {tag for tag, _perm, _id in entries} <= {0x01, 0x04, 0x20}
        if key.endswith("access") and minimal:
            continue  # only the mode bits: the kernel keeps no xattr for it
        out[xattr] = struct.pack("<I", ACL_VERSION) + b"".join(
            struct.pack("<HHI", tag, perm, ident)
            for tag, perm, ident in sorted(entries, key=lambda t: (t[0], t[2])))  # kernel order
    return out


def _parse_acl(text: str) -> list[tuple[int, int, int]]:
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        raw = raw.split("#", 1)[0].strip()
        if not raw:
            continue
        fields = raw.split(":")
        if len(fields) not in (3, 4):
            raise ValueError(f"bad entry {raw[:40]!r}")
        kind = ACL_ABBREV.get(fields[0], fields[0])
        if kind not in ACL_TAGS:
            raise ValueError(f"bad entry {raw[:40]!r}")
        qualifier = fields[1]
        if len(fields) == 4:  # star: user:name:perms:id
            qualifier = fields[3]
        if qualifier and not qualifier.isdigit():
            raise ValueError(f"{kind} {qualifier[:40]!r} has no numeric id")
        tag = ACL_TAGS[kind][1 if qualifier else 0]
        ident = int(qualifier) if qualifier else ACL_NO_ID
        if ident > ACL_NO_ID:
            raise ValueError(f"id {ident} out of range")
        entries.append((tag, _acl_perm(fields[2], raw), ident))
    return entries


def _acl_perm(text: str, raw: str) -> int:
    perm = 0
    for ch, bit in (("r", 4), ("w", 2), ("x", 1)):
        if ch in text:
            perm |= bit
    if set(text) - set("rwx-"):
        raise ValueError(f"bad permissions in {raw[:40]!r}")
    return perm
