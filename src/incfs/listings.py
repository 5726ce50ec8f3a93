"""The directory listings a mount keeps, and the ones it makes ahead of a walk.

A listing is kept from a directory's first READDIR until its names change,
so that the offsets of one pass keep meaning the same entries; the kernel
caches listings itself (FOPEN_CACHE_DIR), so few are kept, and the bound is
in entries as well as directories: a walk of a million files in
1000-entry directories must not keep a million names. An evicted listing is
made again in the same order (a directory's order only changes with its
names, and then `drop` is called anyway).

Listing ahead: `ls -R`, `find`, `du` and `tar` read a directory whole and
then go into its subdirectories in listing order (a pre-order walk). Once a
directory has been read to its end (a reply held its last entry: the
walker then works through those names, its EOF request and the next
directory's come later), while no request waits, the next few
directories such a walk reads (the first subdirectory of the one just read,
else the next subdirectory of its parent, or of the parent's parent...)
are listed before they are asked for, one per pause, so the daemon's work
overlaps the walker's. More than one: a cold walk is bound by the daemon's
work per directory, and with only the next one listed, each directory's
requests waited for the listing of the one after it to be made (the daemon
starts it at EOF, and the walker asks for it a moment later); with several
made ahead, the daemon keeps busy through the walker's own work. Bounded in
directories and entries (listings made ahead and not yet asked for), since
a walk that goes elsewhere wastes them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .fuse import FuseError, Listing

LISTINGS_KEPT = 1024
LISTING_ENTRIES_KEPT = 1 << 16
AHEAD_DIRS = 8  # listings made ahead of a walk and not yet asked for, at most
AHEAD_ENTRIES = LISTING_ENTRIES_KEPT // 4  # ... and their entries (kept, so < the cap)


class Listings:
    """`make(ino)` lists a directory (raising OSError or FuseError);
    `parent_of(ino)` is a directory's parent, 0 for none or unknown."""

    def __init__(self, make: Callable[[int], Listing], parent_of: Callable[[int], int]):
        self._make = make
        self._parent_of = parent_of
        self._kept: OrderedDict[int, Listing] = OrderedDict()
        self._entries = 0  # in all kept listings
        self._last = 0  # the directory a request last read to its end
        self._reading = 0  # the directory a request read last
        self._ahead_done = 0  # the directory whose successors are made
        self._unasked: dict[int, int] = {}  # made ahead, not asked for yet: entries

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def last(self) -> int:
        """The directory a request last read to its end (0: none yet)."""
        reading = self._kept.get(self._reading)
        if reading is not None and reading.ended:
            # the walker goes on to work through the names, and then to the
            # next directory: the time to list what comes next (before it,
            # this one's own requests would wait for those listings)
            self._last = self._reading
        return self._last

    def get(self, ino: int, offset: int = 0) -> Listing:
        """A request's listing (made if not kept), read from entry `offset`."""
        listing = self._get(ino)
        self._unasked.pop(ino, None)
        self._reading = ino
        if offset >= len(listing):
            listing.ended = True  # its EOF (an empty directory's first request too)
        elif offset == 0:
            listing.ended = False  # a new pass
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
            gone, old = self._kept.popitem(last=False)
            self._entries -= len(old)
            self._unasked.pop(gone, None)
        return listing

    def drop(self, ino: int) -> None:
        """Its names changed: the next READDIR lists it anew."""
        listing = self._kept.pop(ino, None)
        self._unasked.pop(ino, None)
        if listing is not None:
            self._entries -= len(listing)

    def ahead(self) -> bool:
        """List one more directory a walk will likely read soon, if any;
        False when there is nothing (more) to do."""
        last = self.last
        if not last or self._ahead_done == last:
            return False
        ino = last
        for _ in range(AHEAD_DIRS):
            if (len(self._unasked) >= AHEAD_DIRS
                    or sum(self._unasked.values()) >= AHEAD_ENTRIES):
                break
            ino = self._next_in_walk(ino)
            if ino is None:
                break
            if ino not in self._kept:
                try:
                    self._unasked[ino] = len(self._get(ino))
                except (OSError, FuseError):
                    # damaged or gone: its own request will say so; and no
                    # more tries from here (it would fail at every pause)
                    self._ahead_done = last
                return True
        self._ahead_done = last
        return False

    def _next_in_walk(self, ino: int) -> int | None:
        """The directory a pre-order walk reads after `ino`, from the
        listings at hand (none is made to find it): its first subdirectory,
        else the next subdirectory after it of its parent, or of the
        parent's parent, and so on up."""
        listing = self._kept.get(ino)
        if listing is not None:
            first = listing.directory_after(-1)
            if first is not None:
                return first
        for _ in range(MAX_UP):
            parent_ino = self._parent_of(ino)
            parent = self._kept.get(parent_ino) if parent_ino else None
            if parent is None:
                return None
            self._kept.move_to_end(parent_ino)  # in use while the walk is under it
            index = parent.index_of_directory(ino)
            sibling = parent.directory_after(index) if index is not None else None
            if sibling is not None:
                return sibling
            ino = parent_ino
        return None


MAX_UP = 64  # parents a successor is looked for in (a deep tree's walk just waits)
