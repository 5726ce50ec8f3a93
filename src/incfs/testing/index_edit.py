"""Editing an image's index in place with its checksums made right again, so
hostile-image tests and fuzzers reach the checks behind the CRCs."""

from __future__ import annotations

import struct
import zlib

from ..format.index import _HEAD, _REGION, HEADER_SIZE, INODE_SIZE, REGIONS
from ..format.index_chunks import DESCRIPTOR_SIZE, DIGEST_SIZE, INCOMPAT_CHUNKS, PIECE_SIZE, digest
from ..format.layout import LOG_START, RECORD_HEADER_SIZE, RecordHeader, RecordType


def regions(image: bytes | bytearray) -> dict[str, tuple[int, int]] | None:
    """(offset, length) of each index region, or None without an index."""
    header = RecordHeader.decode(bytes(image[LOG_START:LOG_START + RECORD_HEADER_SIZE]))
    if header is None or header.type != RecordType.INDEX or header.body_len < HEADER_SIZE:
        return None
    body = LOG_START + RECORD_HEADER_SIZE
    out = {}
    for i, name in enumerate(REGIONS):
        off, length, _crc, _ = _REGION.unpack_from(image, body + _HEAD.size + i * _REGION.size)
        out[name] = (off, length)
    return out


def inode_at(image: bytes | bytearray, ino: int) -> int:
    """Offset of inode `ino`'s record in the image."""
    return regions(image)["inodes"][0] + (ino - 1) * INODE_SIZE


def fix_index(image: bytearray) -> bool:
    """Recompute every region CRC (or with CHUNKS every chunk digest the
    table has room for), the header CRC and the INDEX record's CRC (regions
    that point outside the file keep their CRC). False without an index."""
    found = regions(image)
    if found is None:
        return False
    body = LOG_START + RECORD_HEADER_SIZE
    (incompat,) = struct.unpack_from("<I", image, body + 16)
    if incompat & INCOMPAT_CHUNKS:
        _fix_digests(image, found, body)
    for i, name in enumerate(REGIONS):
        off, length = found[name]
        if off + length <= len(image):
            crc = zlib.crc32(bytes(image[off:off + length]))
            struct.pack_into("<I", image, body + _HEAD.size + i * _REGION.size + 16, crc)
    struct.pack_into("<I", image, body + HEADER_SIZE - 4,
                     zlib.crc32(bytes(image[body:body + HEADER_SIZE - 4])))
    header = RecordHeader.decode(bytes(image[LOG_START:body]))
    image[LOG_START:body] = header.encode(bytes(image[body:body + header.body_len]))
    return True


def _fix_digests(image: bytearray, found: dict[str, tuple[int, int]], body: int) -> None:
    """Each chunk's digest into the chunk table and each table piece's into
    the body, for the chunks the table lists and the file holds."""
    header = RecordHeader.decode(bytes(image[LOG_START:body]))
    tail = body + HEADER_SIZE
    if header.body_len < HEADER_SIZE + DESCRIPTOR_SIZE:
        return
    shift, count, table = struct.unpack_from("<IIQ", image, tail)
    if not 0 < shift < 40 or table >= len(image):
        return
    start, end = found["inodes"][0], found["heap"][0] + found["heap"][1]
    end = min(end, len(image))
    for c in range(count):
        at, slot = start + (c << shift), table + c * DIGEST_SIZE
        if at >= end or slot + DIGEST_SIZE > len(image):
            break
        image[slot:slot + DIGEST_SIZE] = digest(bytes(image[at:min(at + (1 << shift), end)]))
    room = (header.body_len - HEADER_SIZE - DESCRIPTOR_SIZE) // DIGEST_SIZE
    length = min(count * DIGEST_SIZE, len(image) - table)
    for p in range(min(room, (length + PIECE_SIZE - 1) // PIECE_SIZE)):
        piece = bytes(image[table + p * PIECE_SIZE:table + min((p + 1) * PIECE_SIZE, length)])
        slot = tail + DESCRIPTOR_SIZE + p * DIGEST_SIZE
        image[slot:slot + DIGEST_SIZE] = digest(piece)


def set_header_field(image: bytearray, offset: int, fmt: str, value: int) -> None:
    """Change one field of the index header (offset inside it), fixing CRCs."""
    struct.pack_into(fmt, image, LOG_START + RECORD_HEADER_SIZE + offset, value)
    fix_index(image)
