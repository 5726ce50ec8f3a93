#!/usr/bin/env python3
"""atheris target: the record body decoders (records.decode_*). Only
CorruptImage may escape; a decoded value must encode and decode back to itself.

    .venv/bin/python bench/fuzz/fuzz_records.py -max_total_time=300
"""

from __future__ import annotations


import atheris

from _common import corpus_dir, run  # noqa: F401  (instruments incfs on import)
from incfs.errors import CorruptImage
from incfs.format import records as R

DECODERS = [(R.decode_inodes, R.encode_inodes), (R.decode_dirents, R.encode_dirents),
            (R.decode_runs, R.encode_runs), (R.decode_signature, R.encode_signature)]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    decode, encode = DECODERS[data[0] % len(DECODERS)]
    body = data[1:]
    try:
        value = decode(body)
    except CorruptImage:
        return
    # decode drops what it ignores (padding, unknown flag bits), so compare
    # values: what decodes must encode to bytes that decode the same
    if decode(encode(value)) != value:
        raise AssertionError(f"{decode.__name__}: encode/decode does not round-trip")


def seeds() -> None:
    path = corpus_dir("records")
    examples = [
        bytes([0]) + R.encode_inodes([R.InodeEntry(2, 0o100444, 10, metadata=b"m", target=b"")]),
        bytes([1]) + R.encode_dirents([R.DirentEntry(R.DirentOp.ADD, 1, 2, b"name")]),
        bytes([2]) + R.encode_runs([R.BlockRun(2, R.TreeKind.DATA, 0, 4096,
                                               [(R.block_info(R.BlockKind.LZ4, 100), 5)])]),
        bytes([3]) + R.encode_signature(R.SignatureEntry(1, b"k" * 32, b"r" * 32, b"s" * 64)),
    ]
    for i, ex in enumerate(examples):
        (path / f"seed{i}").write_bytes(ex)
    return path


if __name__ == "__main__":
    run(test_one_input, seeds())
