"""incfs.block_dirents: a name block encoded as READDIR records, by the C
extension and by its Python fallback, which must agree byte for byte (and
on what they refuse) and give what Listing packs from the decoded names."""

from __future__ import annotations

import random
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incfs import block_dirents
from incfs.format.index import encode_names
from incfs.fuse import Listing

# `make setup` builds the extension (gcc and python3-dev are in its apt
# list), so a missing one is a failure here, not a skip: the fallback is for
# machines set up some other way.
from incfs._block_dirents import encode as native  # noqa: E402

DT_REG, DT_DIR = stat.S_IFREG >> 12, stat.S_IFDIR >> 12
HIGH = 1 << 40

name_bytes = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))


def block_of(entries: list[tuple[bytes, int, int]], tail: bytes = b"") -> bytes:
    return encode_names(sorted(entries)) + tail


def both(block: bytes, count: int, types: bytes, low: int = 2, high: int = HIGH):
    """The Python and the C answers."""
    py = block_dirents.encode_py(memoryview(block), count, types, low, high)
    c = native(memoryview(block), count, types, low, high)
    return py, c


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(name_bytes, st.integers(2, HIGH), st.sampled_from([DT_REG, DT_DIR])),
                max_size=60, unique_by=lambda e: e[0]))
def test_a_valid_block_encodes_as_listing_packs_it(entries):
    entries.sort()
    names = [n for n, _, _ in entries]
    inos = [i for _, i, _ in entries]
    types = bytes(t for _, _, t in entries)
    block = block_of(entries)
    got = block_dirents.encode(memoryview(block), len(entries), types, 2, HIGH)
    assert got is not None
    listing, want = Listing.from_records(*got, inos, types), Listing(names, inos, types)
    assert listing.plain(0, 1 << 30).tobytes() == want.plain(0, 1 << 30).tobytes()
    assert list(listing._ends) == list(want._ends)
    py, c = both(block, len(entries), types)
    assert c == py


def test_an_empty_block_is_no_records():
    assert block_dirents.encode_py(memoryview(b""), 0, b"", 2, HIGH) == (b"", bytes(4))
    assert native(b"", 0, b"", 2, HIGH) == (b"", bytes(4))


def _table(block: bytearray, i: int, fmt: str, at: int, value: int) -> None:
    struct.pack_into(fmt, block, 16 * i + at, value)


def _swap_first_two(b: bytearray) -> None:
    first, second = bytes(b[0:16]), bytes(b[16:32])
    b[0:16], b[16:32] = second, first


REFUSED = {
    # what the screen must refuse; the block's names are a, bb, cc (at 48, 49, 51)
    "unsorted": _swap_first_two,
    "duplicate": lambda b: b.__setitem__(slice(51, 53), b"bb"),
    "gap between names": lambda b: _table(b, 1, "<I", 0, 16 * 3 + 2),
    "name inside the table": lambda b: _table(b, 0, "<I", 0, 3),
    "name past the end": lambda b: _table(b, 2, "<B", 4, 200),
    "empty name": lambda b: _table(b, 0, "<B", 4, 0),
    "child below low": lambda b: _table(b, 1, "<Q", 8, 1),
    "child above high": lambda b: _table(b, 2, "<Q", 8, HIGH + 1),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_screen_refuses(case):
    block = bytearray(block_of([(b"a", 5, DT_REG), (b"bb", 6, DT_REG), (b"cc", 7, DT_DIR)]))
    assert both(bytes(block), 3, bytes([DT_REG, DT_REG, DT_DIR]))[0] is not None
    REFUSED[case](block)
    assert both(bytes(block), 3, bytes([DT_REG, DT_REG, DT_DIR])) == (None, None)


@pytest.mark.parametrize("name", [b".", b"..", b"a/b", b"a\0b", b"/", b"\0"])
def test_a_bad_name_is_refused(name):
    block = block_of([(b"-", 5, DT_REG), (name, 6, DT_REG), (b"~", 7, DT_REG)])
    assert both(block, 3, bytes([DT_REG] * 3)) == (None, None)


def test_names_that_look_like_dots_are_not_refused():
    entries = [(b"...", 5, DT_REG), (b".a", 6, DT_REG), (b"a.", 7, DT_REG), (b"a..", 8, DT_REG)]
    block = block_of(entries)
    py, c = both(block, 4, bytes([DT_REG] * 4))
    assert py is not None and c == py


def test_a_table_past_the_end_is_refused():
    block = block_of([(b"a", 5, DT_REG), (b"b", 6, DT_REG)])
    assert both(block[:20], 2, bytes([DT_REG] * 2)) == (None, None)
    assert both(block, 1 << 20, bytes([DT_REG] * (1 << 20))) == (None, None)


def test_types_must_be_one_per_entry():
    block = block_of([(b"a", 5, DT_REG)])
    with pytest.raises(ValueError):
        block_dirents.encode_py(memoryview(block), 1, b"", 2, HIGH)
    with pytest.raises(ValueError):
        native(block, 1, b"", 2, HIGH)


def test_c_and_python_agree_on_damaged_blocks():
    """Random bytes changed in valid blocks (the table, the names, past
    them), random bounds: the two give the same answer, refusal or records."""
    rng = random.Random(11)
    agreed = refused = 0
    for _ in range(3000):
        count = rng.randrange(1, 12)
        # some bad names among them from the start, more from the changes
        names = sorted({bytes(rng.choice(b"ab./\0z") for _ in range(rng.randrange(1, 5)))
                        for _ in range(count)})
        entries = [(n, rng.randrange(2, 40), rng.choice([DT_REG, DT_DIR])) for n in names]
        block = bytearray(block_of(entries, tail=bytes(rng.randrange(0, 8))))
        for _ in range(rng.randrange(1, 4)):
            block[rng.randrange(len(block))] = rng.randrange(256)
        types = bytes(rng.choice([DT_REG, DT_DIR, 0, 255]) for _ in entries)
        low, high = rng.choice([(2, 40), (2, 20), (10, (1 << 64) - 1)])
        py, c = both(bytes(block), len(entries), types, low, high)
        assert py == c, (bytes(block), types, low, high)
        agreed += 1
        refused += py is None
    assert agreed == 3000 and 0 < refused < agreed  # both kinds of answer were compared
