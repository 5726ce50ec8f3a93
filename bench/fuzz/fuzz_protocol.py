#!/usr/bin/env python3
"""atheris target: the control protocol. The first byte picks the target:
wire.parse_header (ProtocolError only), wire.decode_payload (ProtocolError
only), wire.tail_slice (ProtocolError only) or the server's dispatch of a
whole request (never raises: every request gets an answer that can be sent).

    .venv/bin/python bench/fuzz/fuzz_protocol.py -max_total_time=300
"""

from __future__ import annotations

import json
import os
import struct

import atheris
import trio

from _common import D, F, SCRATCH, corpus_dir, run
from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import wire
from incfs.control.server import ControlServer
from incfs.control.wire import Op, ProtocolError
from incfs.image import Image
from incfs.integrity import merkle
from incfs.service import Service

STATE = {"server": None, "image": None, "uses": 0}
RECYCLE = 3000  # a fresh image every so many requests keeps memory flat


def server() -> ControlServer:
    if STATE["server"] is None or STATE["uses"] >= RECYCLE:
        if STATE["image"] is not None:
            STATE["image"].close()
        SCRATCH.unlink(missing_ok=True)
        img = Image.create(SCRATCH)
        img.durable = False
        data = b"protocol fuzz " * 1000
        img.create_node(ROOT_INO, b"file", F, size=len(data),
                        root_hash=merkle.tree_of_bytes(data)[0])
        img.create_node(ROOT_INO, b"plain", F, size=3 * BLOCK_SIZE)
        img.create_node(ROOT_INO, b"dir", D)
        STATE.update(image=img, uses=0,
                     server=ControlServer(Service(img, read_timeout=0.01), SCRATCH.with_suffix(".sock"),
                                          os.getuid()))
    STATE["uses"] += 1
    return STATE["server"]


def dispatch(op: int, payload: bytes) -> None:
    srv = server()

    async def run():
        with trio.move_on_after(0.05):  # PENDING_READS may wait: cut it short
            return await srv._dispatch(op, payload)
        return {"ok": True}, b""

    fields, tail = trio.run(run)
    if not (fields.get("ok") is True or (isinstance(fields.get("errno"), int) and fields["errno"] > 0)):
        raise AssertionError(f"answer without ok or errno: {fields!r}")
    wire.encode(Op.RESPONSE, 1, fields, tail)  # must be sendable


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    which, rest = data[0] % 4, data[1:]
    try:
        if which == 0:
            wire.parse_header(rest[:12].ljust(12, b"\0"))
        elif which == 1:
            wire.decode_payload(rest)
        elif which == 2:
            fdp = atheris.FuzzedDataProvider(rest)
            offset = fdp.ConsumeIntInRange(-(1 << 40), 1 << 40)
            length = fdp.ConsumeIntInRange(-(1 << 40), 1 << 40)
            wire.tail_slice(memoryview(fdp.ConsumeBytes(fdp.remaining_bytes())), offset, length)
    except ProtocolError:
        return
    if which == 3:
        op = struct.unpack_from("<H", rest)[0]
        dispatch(op if data[1] & 0x80 else (op % 13), rest[2:])


def seeds():
    path = corpus_dir("protocol")

    def req(op, fields, tail=b""):
        body = json.dumps(fields).encode()
        return bytes([3]) + struct.pack("<H", op) + struct.pack("<I", len(body)) + body + tail

    block = (b"protocol fuzz " * 1000)[:BLOCK_SIZE]
    examples = [
        bytes([0]) + wire.HEADER.pack(100, 1, Op.STATUS, 1),
        bytes([1]) + struct.pack("<I", 2) + b"{}tail",
        bytes([2]) + bytes(40),
        req(Op.STATUS, {}), req(Op.HELLO, {}),
        req(Op.CREATE_FILE, {"parent": 1, "name": "new", "size": 100, "root_hash": "00" * 32}),
        req(Op.MKDIR, {"parent": 1, "name": "d2"}),
        req(Op.SYMLINK, {"parent": 1, "name": "s", "target": "2f"}),
        req(Op.LINK, {"ino": 2, "parent": 4, "name": "l"}),
        req(Op.UNLINK, {"parent": 1, "name": "plain"}),
        req(Op.LOOKUP, {"parent": 1, "name": "file"}),
        req(Op.FILL_BLOCKS, {"ino": 3, "blocks": [{"index": 0, "offset": 0, "length": BLOCK_SIZE,
                                                   "compression": "none", "tree": 0}]}, block),
        req(Op.FILL_BLOCKS, {"ino": 2, "blocks": [{"index": 0, "offset": 0, "length": BLOCK_SIZE,
                                                   "tree": 1}]}, block),
        req(Op.PENDING_READS, {"timeout": 0, "after_serial": 0, "limit": 10}),
        req(Op.FILLED_RANGES, {"ino": 2}), req(Op.READ_LOG, {"after_serial": 0}),
    ]
    for i, ex in enumerate(examples):
        (path / f"seed{i}").write_bytes(ex)
    return path


if __name__ == "__main__":
    run(test_one_input, seeds(), SCRATCH)
