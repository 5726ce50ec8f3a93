"""POSIX metadata in loader requests (protocol 1.1): owners, device numbers
and extended attributes of the inodes a loader creates, parsed from JSON and
checked with the image format's own rules (format/records.py), so a request
can never build an inode that the image could not replay.

Wrong JSON types are protocol errors (EPROTO, as for every field); values
out of range get the errno setxattr(2)/mknod(2) would give (EINVAL, ERANGE
for a long name, E2BIG for a large value or set).
"""

from __future__ import annotations

import errno
import stat

from ..errors import os_error
from ..format.records import (MAX_XATTR_BYTES, MAX_XATTR_NAME, MAX_XATTR_VALUE, MAX_XATTRS,
                              xattr_problem)
from ..namespace import MAX_ID, MAX_RDEV
from .wire import ProtocolError

# Namespaces the kernel passes to a FUSE file system; an attribute in any
# other could be stored but never read back
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.posix_acl_access",
                    b"system.posix_acl_default")
NODE_TYPES = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO,
              "sock": stat.S_IFSOCK}


def owner_fields(f: dict) -> dict:
    """uid, gid and xattrs of a create request, as Image.create_node takes
    them; absent fields keep the 1.0 defaults (root's, no attributes)."""
    return {"uid": _id(f, "uid"), "gid": _id(f, "gid"), "xattrs": xattrs_of(f.get("xattrs"))}


def _id(f: dict, key: str) -> int:
    value = f.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{key} must be an integer, got {value!r}")
    if not 0 <= value <= MAX_ID:
        raise os_error(errno.EINVAL, f"{key} {value} is out of range (0 to {MAX_ID})")
    return value


def rdev_of(f: dict) -> int:
    """A device number: `rdev` (the kernel's encoding), or `major` and
    `minor` (as mknod(1) takes them)."""
    if "major" in f or "minor" in f:
        major, minor = f.get("major", 0), f.get("minor", 0)
        for key, value in (("major", major), ("minor", minor)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError(f"{key} must be an integer, got {value!r}")
            if not 0 <= value <= MAX_ID:
                raise os_error(errno.EINVAL, f"{key} {value} is out of range")
        return _makedev(major, minor)
    value = f.get("rdev", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"rdev must be an integer, got {value!r}")
    if not 0 <= value <= MAX_RDEV:
        raise os_error(errno.EINVAL, f"rdev {value} is out of range")
    return value


def _makedev(major: int, minor: int) -> int:
    """glibc's gnu_dev_makedev (os.makedev takes only 32-bit halves, too)."""
    return ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)


def node_type(f: dict) -> int:
    """The S_IF* bits of a MKNOD request's `type`: chr, blk, fifo or sock."""
    kind = f["type"]
    if not isinstance(kind, str):
        raise ProtocolError(f"type must be a string, got {kind!r}")
    if kind not in NODE_TYPES:
        raise os_error(errno.EINVAL, f"type {kind!r} is not one of {', '.join(NODE_TYPES)}")
    return NODE_TYPES[kind]


def xattrs_of(value) -> dict[bytes, bytes]:
    """`{"name": "<hex value>", ...}` -> {name: value}, checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError("xattrs must be an object of name -> hex value")
    if len(value) > MAX_XATTRS:
        raise os_error(errno.E2BIG, f"more than {MAX_XATTRS} extended attributes")
    out: dict[bytes, bytes] = {}
    for name, hex_value in value.items():
        if not isinstance(hex_value, str):
            raise ProtocolError(f"the value of xattr {name[:40]!r} must be a hex string")
        out[_xattr_name(name)] = bytes.fromhex(hex_value)  # bad hex: ValueError, EINVAL
    _check_sizes(out)
    return out


def _xattr_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_XATTR_NAME:
        raise os_error(errno.ERANGE, f"xattr name {name[:40]!r}... is over {MAX_XATTR_NAME} bytes")
    if not raw.startswith(XATTR_NAMESPACES):
        raise os_error(errno.EINVAL, f"xattr {name[:40]!r}: not in the user., trusted., "
                                     "security. or system.posix_acl_* namespace")
    return raw


def _check_sizes(xattrs: dict[bytes, bytes]) -> None:
    for name, value in xattrs.items():
        if len(value) > MAX_XATTR_VALUE:
            raise os_error(errno.E2BIG, f"xattr {name[:40]!r} is over {MAX_XATTR_VALUE} bytes")
    if sum(len(n) + len(v) + 1 for n, v in xattrs.items()) > MAX_XATTR_BYTES:
        raise os_error(errno.E2BIG, "extended attributes over 1 MiB in all")
    why = xattr_problem(tuple(sorted(xattrs.items())))  # the format's rules, all of them
    if why:
        raise os_error(errno.EINVAL, why)
