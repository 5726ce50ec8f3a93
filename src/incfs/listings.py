"""The directory listings a mount keeps, and the ones it makes ahead of a walk.

A listing is kept from a directory's first READDIR until its names change,
so that the offsets of one pass keep meaning the same entries; the kernel
caches listings itself (FOPEN_CACHE_DIR), so few are kept, and the bound is
in entries as well as directories: a walk of a million files in
1000-entry directories must not keep a million names. An evicted listing is
made again in the same order (a directory's order only changes with its
names, and then `drop` is called anyway).

Listing ahead: `ls -R`, `find`, `du` and `tar` read a directory whole and
then go into its subdirectories in listing order. Once a directory has been
read to its end, while no request waits, the directory such a walk reads
next (the first subdirectory of the one just read, else the next
subdirectory of its parent) is listed before it is asked for, so the
daemon's work overlaps the walker's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .fuse import FuseError, Listing

LISTINGS_KEPT = 1024
LISTING_ENTRIES_KEPT = 1 << 16


class Listings:
    """`make(ino)` lists a directory (raising OSError or FuseError);
    `parent_of(ino)` is a directory's parent, 0 for none or unknown."""

    def __init__(self, make: Callable[[int], Listing], parent_of: Callable[[int], int]):
        self._make = make
        self._parent_of = parent_of
        self._kept: OrderedDict[int, Listing] = OrderedDict()
        self._entries = 0  # in all kept listings
        self._last = 0  # the directory a request last read to its end
        self._ahead_done = 0  # the directory whose successors are made

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def last(self) -> int:
        """The directory a request last read to its end (0: none yet)."""
        return self._last

    def get(self, ino: int, offset: int = 0) -> Listing:
        """A request's listing (made if not kept), read from entry `offset`."""
        listing = self._get(ino)
        if offset >= len(listing):
            # its EOF: the walker goes on to work through the names, and
            # then to the next directory, which is the time to list that
            # one (before, its requests for this one would wait for it)
            self._last = ino
        return listing

    def _get(self, ino: int) -> Listing:
        listing = self._kept.get(ino)
        if listing is not None:
            self._kept.move_to_end(ino)
            return listing
        listing = self._make(ino)
        self._kept[ino] = listing
        self._entries += len(listing)
        while len(self._kept) > 1 and (len(self._kept) > LISTINGS_KEPT
                                       or self._entries > LISTING_ENTRIES_KEPT):
            self._entries -= len(self._kept.popitem(last=False)[1])
        return listing

    def drop(self, ino: int) -> None:
        """Its names changed: the next READDIR lists it anew."""
        listing = self._kept.pop(ino, None)
        if listing is not None:
            self._entries -= len(listing)

    def ahead(self) -> bool:
        """List the directory a walk will likely read next, if not kept;
        False when there is nothing (more) to do."""
        if not self._last or self._ahead_done == self._last:
            return False
        for ino in self._successors(self._last):
            if ino not in self._kept:
                try:
                    self._get(ino)
                except (OSError, FuseError):
                    # damaged or gone: its own request will say so; and no
                    # more tries from here (it would fail at every pause)
                    self._ahead_done = self._last
                return True
        self._ahead_done = self._last
        return False

    def _successors(self, ino: int) -> list[int]:
        """The first subdirectory of `ino` and its next sibling directory,
        of those whose listings are at hand (none is made to find them)."""
        found = []
        listing = self._kept.get(ino)
        if listing is not None:
            first = listing.directory_after(-1)
            if first is not None:
                found.append(first)
        parent_ino = self._parent_of(ino)
        parent = self._kept.get(parent_ino)
        if parent is not None:
            self._kept.move_to_end(parent_ino)  # in use while the walk is under it
            index = _index(parent, ino)
            sibling = parent.directory_after(index) if index is not None else None
            if sibling is not None:
                found.append(sibling)
        return found


def _index(listing: Listing, ino: int) -> int | None:
    try:
        return listing.inos.index(ino)
    except ValueError:
        return None
