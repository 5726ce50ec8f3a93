#!/usr/bin/env python3
"""atheris target: the image opener and the read path. The input is a whole
backing image; with the first byte odd, every record's CRC and back link are
fixed up first so that mutations reach the semantic checks behind them. Only
IncfsError / OSError(errno) / MissingBlock may escape opening and reading.

    .venv/bin/python bench/fuzz/fuzz_image.py -max_total_time=300 -max_len=131072
"""

from __future__ import annotations

import struct
import zlib

import atheris

from _common import SCRATCH, corpus_dir, exercise_image, live_image, run
from incfs.format.layout import LOG_START, RECORD_HEADER_SIZE, RecordHeader, Superblock
from incfs.testing.index_edit import fix_index

COUNT = [0]


def fix_up(image: bytearray) -> None:
    """Recompute every plausible record's CRC and back link, and the superblock's."""
    size = struct.calcsize("<8sHHBBH16sQQQQI")
    if len(image) >= size and image[:8] == b"INCFSIMG":
        struct.pack_into("<I", image, size - 4, zlib.crc32(bytes(image[:size - 4])))
    fix_index(image)  # an INDEX first record: its region and header CRCs too
    offset, prev = LOG_START, 0
    while offset + RECORD_HEADER_SIZE <= len(image):
        raw = bytes(image[offset:offset + RECORD_HEADER_SIZE])
        header = RecordHeader.decode(raw)
        if header is None or offset + header.length > len(image):
            return
        header = RecordHeader(header.type, header.flags, header.length, prev, header.body_len)
        body = bytes(image[offset + RECORD_HEADER_SIZE:offset + RECORD_HEADER_SIZE + header.body_len])
        image[offset:offset + RECORD_HEADER_SIZE] = header.encode(body)
        prev, offset = offset, offset + header.length


def test_one_input(data: bytes) -> None:
    if not data:
        return
    image = bytearray(data[1:])
    if data[0] & 1:
        fix_up(image)
    SCRATCH.write_bytes(bytes(image))
    COUNT[0] += 1
    exercise_image(SCRATCH, verify=(data[0] & 6) == 6)


def seeds():
    path = corpus_dir("image")
    live = live_image(SCRATCH)
    (path / "live").write_bytes(b"\x01" + live)
    (path / "live-raw").write_bytes(b"\x00" + live)
    (path / "empty").write_bytes(b"\x01" + Superblock(uuid=b"u" * 16).encode() + live[LOG_START:LOG_START + 104])
    return path


if __name__ == "__main__":
    run(test_one_input, seeds(), SCRATCH)
