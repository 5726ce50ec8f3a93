"""READDIR replies from incfs.fuse.dirents.Listing, and the listings a
mount keeps and makes ahead (incfs.listings), without a kernel."""

from __future__ import annotations

import errno
import stat

import pytest

from incfs.fuse import FuseError, Listing, abi
from incfs.listings import Listings

DT_REG, DT_DIR, DT_LNK = stat.S_IFREG >> 12, stat.S_IFDIR >> 12, stat.S_IFLNK >> 12
ENTRY = b"E" * abi.ENTRY_OUT_SIZE  # stands in for a packed fuse_entry_out


def parse(reply: bytes, plus: bool) -> list[tuple[int, int, int, bytes]]:
    """(ino, next offset, d_type, name) of each record; every record must
    be 8-aligned and zero-padded."""
    out, pos = [], 0
    while pos < len(reply):
        if plus:
            assert reply[pos:pos + abi.ENTRY_OUT_SIZE] == ENTRY
            pos += abi.ENTRY_OUT_SIZE
        ino, off, namelen, dtype = abi.DIRENT_HEAD.unpack_from(reply, pos)
        start = pos + abi.DIRENT_HEAD.size
        name = reply[start:start + namelen]
        end = pos + abi.dirent_size(namelen, plus=False)
        assert reply[start + namelen:end] == bytes(end - start - namelen)
        out.append((ino, off, dtype, name))
        pos = end
    assert pos == len(reply)
    return out


def read_all(listing: Listing, size: int, plus: bool = False, offset: int = 0):
    """What the kernel does: ask from the last record's offset until an
    empty reply."""
    seen = []
    while True:
        if plus:
            reply = listing.plus(offset, size, lambda ino, d_type: ENTRY)
        else:
            reply = bytes(listing.plain(offset, size))
        assert len(reply) <= size
        if not reply:
            return seen
        records = parse(reply, plus)
        seen += records
        offset = records[-1][1]


# names a hostile or merely unusual tree may hold: every byte but NUL and
# "/", the longest allowed, one byte, lengths on each side of the padding
HOSTILE = [bytes([b]) for b in range(1, 256) if b != ord("/")] + [
    b"x" * 255, b"\xff" * 254, b"a\nb", b"-rf", b"..." , b" ", b"e\xcc\x81",
    b"1234567", b"12345678", b"123456789"]


def make(names: list[bytes]) -> tuple[Listing, list[tuple[bytes, int, int]]]:
    kinds = (DT_REG, DT_DIR, DT_LNK)
    want = [(name, 100 + i, kinds[i % 3]) for i, name in enumerate(names)]
    listing = Listing([n for n, _, _ in want], [i for _, i, _ in want],
                      bytes(t for _, _, t in want))
    return listing, want


@pytest.mark.parametrize("size", [4096, 8192, 32768, 1 << 20])
@pytest.mark.parametrize("plus", [False, True])
def test_a_listing_larger_than_a_reply_gives_every_name_once(size, plus):
    listing, want = make(HOSTILE)
    got = read_all(listing, size, plus)
    assert [(name, ino, dtype) for ino, _, dtype, name in got] == want
    assert [off for _, off, _, _ in got] == list(range(1, len(want) + 1))


def test_reading_resumes_at_any_offset_as_after_seekdir():
    listing, want = make(HOSTILE)
    for start in (0, 1, 7, 100, len(want) - 1):
        got = read_all(listing, 4096, offset=start)
        assert [name for *_, name in got] == [n for n, _, _ in want[start:]]
    assert read_all(listing, 4096, offset=len(want)) == []
    assert read_all(listing, 4096, offset=1 << 62) == []
    assert listing.plus(len(want), 4096, lambda ino, d_type: ENTRY) == b""


def test_an_empty_directory_answers_eof_at_once():
    listing = Listing([], [], b"")
    assert len(listing) == 0 and bytes(listing.plain(0, 4096)) == b""
    assert listing.plus(0, 4096, lambda ino, d_type: ENTRY) == b""
    assert listing.directory_after(-1) is None


def test_the_reply_never_splits_a_record():
    listing, _ = make([b"x" * 255] * 3)
    one = abi.dirent_size(255, plus=False)
    assert len(listing.plain(0, one)) == one
    assert len(listing.plain(0, 2 * one - 1)) == one
    assert len(listing.plus(0, abi.ENTRY_OUT_SIZE + one, lambda ino, d_type: ENTRY)) == (
        abi.ENTRY_OUT_SIZE + one)


def test_plus_leaves_out_entries_it_has_no_answer_for_and_keeps_the_offsets():
    listing, want = make([b"a", b"b", b"c", b"d"])
    reply = listing.plus(0, 4096, lambda ino, d_type: None if ino == 101 else ENTRY)
    got = parse(reply, plus=True)
    assert [(name, off) for _, off, _, name in got] == [(b"a", 1), (b"c", 3), (b"d", 4)]


def test_past_the_files_size_plus_goes_on_only_through_directories():
    names = [b"d1", b"d2", b"f1", b"d3"]
    listing = Listing(names, [10, 11, 12, 13], bytes([DT_DIR, DT_DIR, DT_REG, DT_DIR]))
    reply = listing.plus(0, 4096, lambda ino, d_type: ENTRY, files_size=1)
    assert [name for *_, name in parse(reply, plus=True)] == [b"d1", b"d2"]
    reply = listing.plus(2, 4096, lambda ino, d_type: ENTRY, files_size=0)
    # a file first still goes in (an empty reply would mean EOF), then directories
    assert [name for *_, name in parse(reply, plus=True)] == [b"f1", b"d3"]


def test_names_over_255_bytes_or_unequal_columns_are_refused():
    with pytest.raises(ValueError):
        Listing([b"x" * 256], [5], bytes([DT_REG]))
    with pytest.raises(ValueError):
        Listing([b"a", b"b"], [5], bytes([DT_REG, DT_REG]))


# --- the listings a mount keeps -------------------------------------------------

class Tree:
    """Directories by inode: ino -> (parent, [(name, child, d_type)])."""

    def __init__(self, dirs: dict[int, tuple[int, list[tuple[bytes, int, int]]]]):
        self.dirs = dirs
        self.made: list[int] = []

    def make(self, ino: int) -> Listing:
        if ino not in self.dirs:
            raise FuseError(errno.ENOTDIR)
        self.made.append(ino)
        entries = self.dirs[ino][1]
        return Listing([n for n, _, _ in entries], [c for _, c, _ in entries],
                       bytes(t for _, _, t in entries))

    def parent_of(self, ino: int) -> int:
        return self.dirs[ino][0] if ino in self.dirs else 0


def test_a_walk_finds_its_next_directory_already_listed():
    # 1: a (2), f, b (3); 2: c (4); 3: nothing
    tree = Tree({1: (0, [(b"a", 2, DT_DIR), (b"f", 9, DT_REG), (b"b", 3, DT_DIR)]),
                 2: (1, [(b"c", 4, DT_DIR)]), 3: (1, []), 4: (2, [])})
    listings = Listings(tree.make, tree.parent_of)
    assert not listings.ahead()  # nothing listed yet
    listings.get(1)
    assert not listings.ahead()  # not before the walker has read it all
    listings.get(1, offset=3)
    assert listings.ahead()
    assert tree.made == [1, 2]  # /a first: the first subdirectory
    while listings.ahead():
        pass
    # then /a/c (a's first), then /b (the next after a, going up from c)
    assert tree.made == [1, 2, 4, 3]
    listings.get(2, offset=1)
    listings.get(4)
    listings.get(3)
    assert tree.made == [1, 2, 4, 3]  # the requests found them made


def test_listing_ahead_goes_several_directories_deep_and_stops_at_its_bound(monkeypatch):
    import incfs.listings as mod
    monkeypatch.setattr(mod, "AHEAD_DIRS", 3)
    # the root holds 20 leaf directories, 2..21
    dirs = {1: (0, [(b"d%02d" % i, 2 + i, DT_DIR) for i in range(20)])}
    dirs.update({2 + i: (1, [(b"f", 100 + i, DT_REG)]) for i in range(20)})
    tree = Tree(dirs)
    listings = Listings(tree.make, tree.parent_of)
    listings.get(1, offset=20)
    while listings.ahead():
        pass
    assert tree.made == [1, 2, 3, 4]  # three ahead, no more
    listings.get(2)  # the walk asks for the first one ...
    while listings.ahead():
        pass
    assert tree.made == [1, 2, 3, 4]  # ... but it has not read it to its end yet
    listings.get(2, offset=1)
    while listings.ahead():
        pass
    assert tree.made == [1, 2, 3, 4, 5]  # one asked for: one more made


def test_listing_ahead_survives_a_directory_that_fails():
    tree = Tree({1: (0, [(b"gone", 7, DT_DIR)])})
    listings = Listings(tree.make, tree.parent_of)
    listings.get(1, offset=1)
    assert listings.ahead() is True  # tried, failed quietly
    assert listings.ahead() is False  # and not again at every pause
    with pytest.raises(FuseError):
        listings.get(7)  # the request itself gets the error


def test_kept_listings_are_bounded_in_entries_and_dropped_on_change(monkeypatch):
    import incfs.listings as mod
    monkeypatch.setattr(mod, "LISTING_ENTRIES_KEPT", 25)
    dirs = {ino: (1, [(b"n%d" % i, 100 + i, DT_REG) for i in range(10)])
            for ino in range(2, 6)}
    tree = Tree(dirs)
    listings = Listings(tree.make, tree.parent_of)
    for ino in range(2, 6):
        listings.get(ino)
    assert len(listings) == 2  # 20 entries kept, not 40
    first = listings.get(5)
    assert listings.get(5) is first
    listings.drop(5)
    assert listings.get(5) is not first
