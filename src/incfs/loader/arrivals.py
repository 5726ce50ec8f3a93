"""Blocks of a fetch job as their bytes come in.

A miss fetches up to `amplify` bytes around the block a read needs, and
readahead fetches ranges of up to `request_max`; a read that needs only the
first few blocks of such a range should not wait for its end (256 KiB take
210 ms at 10 Mbit/s, where the 16 KiB a first read asks for take 13 ms).
`Arrivals` follows the body of each range as the source delivers it
(`Source.read_streaming`): every block whose bytes are complete is checked
against its CRC (when the map has one) and queued; the loader's early storer
(`JobRunner._store_arrivals`) fills what a waiting read can use, and the rest
is stored as before once the ranges are in. Nothing here stores or waits
except on the queue's event.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import trio

from .plan import Range, Want


class Arrived(NamedTuple):
    """One block's fetched bytes, and the range (request) they came in."""

    want: Want
    data: bytes
    range_index: int

    @property
    def key(self) -> tuple[int, int]:
        return self.want.tree, self.want.index


class Arrivals:
    """The blocks of `ranges` in the order their bytes complete.

    `progress(i)` is the callback for range i's body; `finish(i, data,
    origin)` hands the whole body once the request is done (blocks the
    callback already saw are not handed twice, even when a retry starts the
    body again). `on_damage(want)` is called for each block whose bytes fail
    their CRC: such a block is in `bad`, never queued."""

    def __init__(self, ranges: list[Range], on_damage: Callable[[Want], None]):
        self.ranges = ranges
        self._next = [0] * len(ranges)  # per range: its first want not yet seen
        self._on_damage = on_damage
        self.got: list[Arrived] = []  # every intact block, in arrival order
        self.bad: dict[tuple[int, int], int] = {}  # (tree, index) -> range index
        self._queue: list[Arrived] = []  # intact blocks the early storer has not taken
        self._changed = trio.Event()
        self.closed = False
        self.origins: dict[int, int | None] = {}  # range index -> mirror, once finished
        # kept by the early storer: blocks it took (stored, or found present)
        # and, by range index, those of them the image refused
        self.handled: set[tuple[int, int]] = set()
        self.failed_early: dict[tuple[int, int], int] = {}

    def progress(self, i: int) -> Callable[[bytes | bytearray], None]:
        def arrived(body: bytes | bytearray) -> None:
            self._advance(i, body)
        return arrived

    def finish(self, i: int, data: bytes, origin: int | None) -> None:
        """Range i is in whole, from mirror `origin`."""
        self._advance(i, data)
        self.origins[i] = origin

    def entry(self, item: Arrived) -> tuple[Want, bytes, int | None]:
        """(want, bytes, origin mirror) of a block, as the loader stores it
        (the origin is None until its range is in)."""
        return item.want, item.data, self.origins.get(item.range_index)

    def close(self) -> None:
        """No more bytes will come: wake the early storer to let it end."""
        self.closed = True
        self._changed.set()

    def damaged(self) -> dict[tuple[int, int], int | None]:
        """Blocks whose bytes failed their CRC, with the mirror that sent
        each (to avoid it when they are fetched again)."""
        return {key: self.origins.get(i) for key, i in self.bad.items()}

    def early_failed(self) -> dict[tuple[int, int], int | None]:
        """Blocks the early storer handed in that the image refused, with
        the mirror that sent each."""
        return {key: self.origins.get(i) for key, i in self.failed_early.items()}

    async def take(self) -> list[Arrived]:
        """Wait until blocks are queued (or the fetch is over); take them.
        An empty list means closed with nothing left."""
        while not self._queue and not self.closed:
            await self._changed.wait()
            self._changed = trio.Event()
        queued, self._queue = self._queue, []
        return queued

    def _advance(self, i: int, body: bytes | bytearray) -> None:
        r = self.ranges[i]
        wants = r.wants
        k = self._next[i]
        added = False
        while k < len(wants):
            w = wants[k]
            start = w.offset - r.offset
            if start + w.size > len(body):
                break  # not all in yet; a retry's body also restarts here
            # one copy (a slice of a bytearray would be a second)
            data = bytes(memoryview(body)[start:start + w.size])
            k += 1
            if w.crc is not None and zlib.crc32(data) != w.crc:
                # damaged on the way: never stored; fetched again
                self.bad[(w.tree, w.index)] = i
                self._on_damage(w)
                continue
            item = Arrived(w, data, i)
            self.got.append(item)
            self._queue.append(item)
            added = True
        self._next[i] = k
        if added:
            self._changed.set()
