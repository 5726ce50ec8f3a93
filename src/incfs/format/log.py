"""The append-only record log: scanning it back (with recovery) and appending.

Crash model: a record counts once its header, body and payload are all on
disk. A scan stops at the first record that is cut short, fails its CRC, or
does not link back to its predecessor; everything before it is kept and the
rest is reported as dropped. A writable open truncates that torn tail so new
records follow the last good one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable

from .layout import (CRITICAL_TYPE_BIT, LOG_START, RECORD_ALIGN,
                     RECORD_HEADER_SIZE, RecordHeader, RecordType)
from ..errors import CorruptImage

# Called with (offset, header, body) for each complete non-DATA record; the
# body of DATA records (their payload) is not read during a scan.
RecordSink = Callable[[int, RecordHeader, bytes], None]

SCAN_BUFFER = 1 << 20


@dataclass
class ScanResult:
    end: int  # offset just past the last good record: where appends go
    last_record: int  # offset of the last good record (0 if none)
    records: int = 0
    file_size: int = 0
    dropped_reason: str = ""
    skipped_unknown: list[int] = field(default_factory=list)

    @property
    def dropped_bytes(self) -> int:
        return max(0, self.file_size - self.end)


def scan_log(f: io.BufferedReader, file_size: int, sink: RecordSink,
             start: int = LOG_START) -> ScanResult:
    """Walk the log from `start`, handing every good record to `sink`."""
    result = ScanResult(end=start, last_record=0, file_size=file_size)
    offset, prev = start, 0
    while offset < file_size:
        reason = _scan_one(f, offset, prev, file_size, sink, result)
        if reason:
            result.dropped_reason = f"at offset {offset}: {reason}"
            break
        prev = offset
        offset = result.end
    return result


def _scan_one(f, offset: int, prev: int, file_size: int, sink: RecordSink,
              result: ScanResult) -> str:
    """Read one record; return why it is not usable, or "" when it was taken."""
    f.seek(offset)
    raw = f.read(RECORD_HEADER_SIZE)
    header = RecordHeader.decode(raw)
    if header is None:
        return "no valid record header" if any(raw) else "zero-filled tail"
    if header.prev != prev:
        return "record does not link to its predecessor"
    if offset + header.length > file_size:
        return "record is cut short by the end of the file"
    body = f.read(header.body_len)
    if len(body) != header.body_len or not RecordHeader.check(raw, body):
        return "record checksum mismatch"
    if header.type & CRITICAL_TYPE_BIT and header.type not in RecordType._value2member_map_:
        raise CorruptImage(f"record type {header.type:#x} is required but unknown "
                           "to this version of incfs")
    if header.type not in RecordType._value2member_map_:
        result.skipped_unknown.append(header.type)
    elif header.type != RecordType.DATA:
        sink(offset, header, body)
    result.records += 1
    result.last_record = offset
    result.end = offset + header.length
    return ""


class LogAppender:
    """Appends records at the end of the log of an image opened read-write.

    Writes are positional (`os.pwrite`) and each record goes out in one call,
    so a record is either wholly written or detectably torn.
    """

    def __init__(self, fd: int, end: int, last_record: int):
        self.fd = fd
        self.end = end
        self.last_record = last_record

    def append(self, rtype: RecordType, body: bytes, flags: int = 0) -> int:
        """Append a metadata record; returns its offset."""
        length = _aligned(RECORD_HEADER_SIZE + len(body))
        header = RecordHeader(int(rtype), flags, length, self.last_record, len(body))
        head = header.encode(body)
        return self._write([head, body, bytes(length - len(head) - len(body))], length)

    def payload_base(self) -> int:
        """Where the payload of the next `write_data` record will start, so a
        caller can place 4 KiB-aligned raw blocks before building it."""
        return self.end + RECORD_HEADER_SIZE

    def pad_to(self, target: int) -> None:
        """Append a PAD record ending exactly at `target` (8-aligned, at
        least one header past the end). Its body is a hole in the file, so a
        long pad costs no disk space."""
        length = target - self.end
        if length < RECORD_HEADER_SIZE or length % RECORD_ALIGN:
            raise ValueError(f"cannot pad from {self.end} to {target}")
        header = RecordHeader(int(RecordType.PAD), 0, length, self.last_record, 0)
        start = self.end
        os.pwrite(self.fd, header.encode(b""), start)
        if os.fstat(self.fd).st_size < target:
            os.ftruncate(self.fd, target)
        self.last_record = start
        self.end = target

    def pad_to_payload_alignment(self, alignment: int = 4096) -> None:
        """Pad so the next DATA payload starts on an `alignment` boundary."""
        self.pad_to(_round_up(self.end + 2 * RECORD_HEADER_SIZE, alignment) - RECORD_HEADER_SIZE)

    def pad_past(self, offset: int) -> None:
        """Pad so the log ends at or beyond `offset`."""
        self.pad_to(_aligned(max(offset, self.end + RECORD_HEADER_SIZE)))

    def begin_record(self, rtype: RecordType, body: bytes, payload_len: int) -> int:
        """Append a record whose payload (`payload_len` bytes, not covered by
        the record CRC: it carries its own) the caller has already written
        right after the aligned body. Returns the payload offset."""
        payload = _aligned(RECORD_HEADER_SIZE + len(body))
        length = _aligned(payload + payload_len)
        header = RecordHeader(int(rtype), 0, length, self.last_record, len(body))
        offset = self.end
        os.pwrite(self.fd, (header.encode(body) + body).ljust(payload, b"\0"), offset)
        self.last_record = offset
        self.end = offset + length
        return offset + payload

    def begin_data(self, payload_len: int) -> int:
        """Write only the header of a DATA record of `payload_len` bytes and
        move the end past it; the caller writes the payload itself (for
        payloads too big to hold in memory). Returns the payload offset."""
        length = _aligned(RECORD_HEADER_SIZE + payload_len)
        header = RecordHeader(int(RecordType.DATA), 0, length, self.last_record, 0)
        offset = self.end
        os.pwrite(self.fd, header.encode(b""), offset)
        self.last_record = offset
        self.end = offset + length
        return offset + RECORD_HEADER_SIZE

    def write_data(self, payload: bytes | bytearray) -> int:
        """Append a DATA record carrying `payload`; returns the payload offset.
        Header, payload and padding go out in one pwritev, so a fill's
        megabytes are not copied to join them."""
        length = _aligned(RECORD_HEADER_SIZE + len(payload))
        header = RecordHeader(int(RecordType.DATA), 0, length, self.last_record, 0)
        head = header.encode(b"")
        padding = bytes(length - len(head) - len(payload))
        offset = self._write([head, payload, padding], length)
        return offset + RECORD_HEADER_SIZE

    def _write(self, pieces: list[bytes | bytearray], length: int) -> int:
        offset = self.end
        written = os.pwritev(self.fd, pieces, offset)
        if written != length:
            raise OSError(f"short write to backing image at offset {offset}")
        self.last_record = offset
        self.end = offset + length
        return offset

    def sync(self) -> None:
        os.fdatasync(self.fd)


def _round_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _aligned(n: int) -> int:
    return (n + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN
