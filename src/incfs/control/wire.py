"""Framing of control messages, shared by server and client.

A frame is a 12-byte header -- payload length (u32), protocol version (u16),
operation (u16), request id (u32), little-endian -- then the payload: a u32
length, that many bytes of UTF-8 JSON, and a binary tail. Block data travels
in the tail; the JSON names each block's slice of it by offset and length
relative to the tail. There are no pointers and no native structs, and every
length is checked before it is trusted.
"""

from __future__ import annotations

import enum
import json
import struct

VERSION = 1  # of the framing: a frame of another version is refused
# Revision of the operations within version 1: 1.1 added owners, device
# nodes and xattrs on creates (MKNOD), the last read error and per-uid read
# timeouts. Old clients are unaffected; new ones check HELLO's `minor`
# before sending 1.1 fields (a 1.0 daemon would ignore them silently).
MINOR = 1
HEADER = struct.Struct("<IHHI")
MAX_FRAME = 64 * 1024 * 1024
MAX_JSON = 16 * 1024 * 1024


class Op(enum.IntEnum):
    HELLO = 1
    CREATE_FILE = 2
    MKDIR = 3
    LINK = 4
    UNLINK = 5
    FILL_BLOCKS = 6
    PENDING_READS = 7
    FILLED_RANGES = 8
    READ_LOG = 9
    STATUS = 10
    LOOKUP = 11
    SYMLINK = 12
    PRESENCE = 13
    MKNOD = 14  # 1.1
    LAST_READ_ERROR = 15  # 1.1
    SET_READ_TIMEOUTS = 16  # 1.1
    READ_TIMEOUTS = 17  # 1.1
    RESPONSE = 0x8000


class ProtocolError(Exception):
    """A frame that cannot be accepted; the connection is closed after it."""


def encode(op: int, request_id: int, fields: dict, tail: bytes = b"") -> bytes:
    body = json.dumps(fields, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(body)) + body + tail
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload), VERSION, op, request_id) + payload


def parse_header(raw: bytes) -> tuple[int, int, int, int]:
    length, version, op, request_id = HEADER.unpack(raw)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return length, version, op, request_id


def decode_payload(payload: bytes) -> tuple[dict, memoryview]:
    if len(payload) < 4:
        raise ProtocolError("payload too short")
    (jlen,) = struct.unpack_from("<I", payload)
    if jlen > MAX_JSON or 4 + jlen > len(payload):
        raise ProtocolError("JSON part overruns the frame")
    try:
        fields = json.loads(bytes(payload[4:4 + jlen]))
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: RecursionError
        raise ProtocolError("JSON part is malformed") from None
    if not isinstance(fields, dict):
        raise ProtocolError("JSON part is not an object")
    return fields, memoryview(payload)[4 + jlen:]


def tail_slice(tail: memoryview, offset, length) -> bytes:
    if not (isinstance(offset, int) and isinstance(length, int)):
        raise ProtocolError("block offset and length must be integers")
    if offset < 0 or length < 0 or offset + length > len(tail):
        raise ProtocolError("block slice is outside the message")
    return bytes(tail[offset:offset + length])
