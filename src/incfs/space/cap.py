"""`--cache-size`: a cap on the cache file's allocated size (st_blocks * 512,
metadata and hash trees included), enforced before every fill.

Data blocks are kept in chunks of CHUNK blocks, ordered by last use (a read
or a fill touches a chunk). Before a fill appends, if the file would grow
past the cap, the least recently used chunks are released (incfs.space.
release.evict: one RELEASED record, then punched holes) until the fill fits
with a little slack, so the cap holds at all times, not eventually. Never
released: hash blocks and metadata (the tree needs them), blocks of chunks a
read is working on right now (pinned for the read's whole life, waits
included), blocks the source cannot give again. A released block is absent:
a later read fetches it again, counted as a refetch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Iterator

from .. import BLOCK_SIZE
from ..errors import UsageError
from ..format.records import BlockKind, TreeKind, info_kind, info_size
from . import gc
from . import punch as holes
from .plainfiles import is_plain
from .release import evict, releasable

log = logging.getLogger("incfs.space")

CHUNK = 64  # blocks per unit of eviction: 256 KiB
FILL_OVERHEAD = 2 * BLOCK_SIZE  # a fill's records: the DATA header's page, the BLOCKS record
MIN_DATA = 4 << 20  # room for data the cap must leave: a read's window must fit
GC_EVERY = 5.0  # seconds between online gc steps (each walks every map)

Chunk = tuple[int, int]  # (ino, index // CHUNK)


def minimum(image) -> int:
    """The smallest cap this cache can live with: its metadata, every hash
    tree whole, and MIN_DATA of data."""
    hashes = sum(n.hashes.count for n in image.ns.inodes.values() if n.hashes is not None)
    metadata = max(image.superblock.meta_end, holes.allocated(image.fd) - stored_data(image))
    return metadata + hashes * BLOCK_SIZE + MIN_DATA


def stored_data(image) -> int:
    total = 0
    for node in image.ns.inodes.values():
        if node.data is not None and node.data.present:
            total += sum(info_size(info) for _i, o, info, _c in node.data.entries()
                         if info_kind(info) is not BlockKind.ZERO and not is_plain(o))
    return total


def check(image, cap: int) -> None:
    """A clear error at mount when the cap cannot hold the tree itself."""
    need = minimum(image)
    if cap < need:
        raise UsageError(f"--cache-size {_mib(cap)} is too small for this image: its metadata "
                         f"and hash trees take {_mib(need - MIN_DATA)}; use at least {_mib(need)}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}MiB"


class CacheCap:
    """The cap of one mounted cache. Fill hooks run in the writer's thread
    under the image lock; read hooks on the trio thread: `_lock` keeps the
    use order consistent between them."""

    def __init__(self, image, cap: int):
        self.image, self.cap = image, cap
        self.slack = max(cap // 64, CHUNK * BLOCK_SIZE)  # released beyond need: fewer records
        self.order: OrderedDict[Chunk, None] = OrderedDict()
        self.pins: dict[Chunk, int] = {}
        self.released: dict[int, bytearray] = {}  # per file, a bit per block given up
        self.counters = {"blocks_released": 0, "bytes_released": 0, "blocks_refetched": 0,
                         "releases": 0, "over_cap": 0, "gc_runs": 0, "gc_bytes": 0}
        self.peak = 0
        self._last_gc = -GC_EVERY
        self._lock = threading.Lock()
        self._seed()

    def _seed(self) -> None:
        """Chunks already cached, oldest first (a later fill lies further on)."""
        newest: dict[Chunk, int] = {}
        for node in self.image.ns.inodes.values():
            if node.data is None or not node.data.present:
                continue
            for i, offset, info, _crc in node.data.entries():
                if info_kind(info) is not BlockKind.ZERO and not is_plain(offset):
                    key = (node.ino, i // CHUNK)
                    newest[key] = max(newest.get(key, 0), offset)
        for key in sorted(newest, key=newest.__getitem__):
            self.order[key] = None

    # --- reads (trio thread) ------------------------------------------------------

    def touch(self, ino: int, first: int, last: int) -> None:
        """A read of data blocks [first, last] (Waits.read_hooks)."""
        with self._lock:
            for c in range(first // CHUNK, last // CHUNK + 1):
                if (ino, c) in self.order:
                    self.order.move_to_end((ino, c))

    @contextlib.contextmanager
    def pinned(self, ino: int, offset: int, size: int) -> Iterator[None]:
        """Keep the chunks of a read from release while it runs (and waits)."""
        keys = [(ino, c) for c in range(offset // BLOCK_SIZE // CHUNK,
                                        max(offset, offset + size - 1) // BLOCK_SIZE // CHUNK + 1)]
        with self._lock:
            for k in keys:
                self.pins[k] = self.pins.get(k, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for k in keys:
                    left = self.pins.pop(k) - 1
                    if left:
                        self.pins[k] = left

    # --- fills (the writer's thread, image lock held) ----------------------------

    def before_fill(self, blocks, extra: int = 0) -> None:
        """Make room for a fill of `blocks` (and `extra` bytes it may add)."""
        incoming = sum(-(-len(b.data) // BLOCK_SIZE) * BLOCK_SIZE for b in blocks)
        self.make_room(incoming + extra + FILL_OVERHEAD)

    def after_fill(self, ino: int, blocks) -> None:
        node = self.image.ns.inodes.get(ino)
        if node is None or node.data is None:
            return
        bits = self.released.get(ino)
        chunks = set()
        for b in blocks:
            if b.tree != TreeKind.DATA or not node.data.is_present(b.index):
                continue
            chunks.add((ino, b.index // CHUNK))
            if bits is not None and bits[b.index >> 3] & (1 << (b.index & 7)):
                bits[b.index >> 3] &= ~(1 << (b.index & 7))
                self.counters["blocks_refetched"] += 1
        with self._lock:
            for key in sorted(chunks):
                self.order[key] = None
                self.order.move_to_end(key)
        self.peak = max(self.peak, holes.allocated(self.image.fd))

    def make_room(self, incoming: int) -> None:
        """Release least recently used chunks until `incoming` more bytes fit."""
        for _attempt in range(4):  # punches free whole pages only: check again
            over = holes.allocated(self.image.fd) + incoming - self.cap
            if over <= 0:
                return
            victims = self._victims(over + self.slack)
            if not victims:
                break
            self._release(victims)
        if holes.allocated(self.image.fd) + incoming > self.cap and \
                time.monotonic() - self._last_gc >= GC_EVERY:
            self._gc_step()
        if holes.allocated(self.image.fd) + incoming > self.cap:
            self.counters["over_cap"] += 1  # nothing more may go: the fill still must

    def _victims(self, want: int) -> list[tuple[int, int, int]]:
        out, found = [], 0
        with self._lock:
            for key in self.order:
                if found >= want:
                    break
                if key in self.pins:
                    continue
                node = self.image.ns.inodes.get(key[0])
                if node is None or node.data is None or not releasable(self.image, node):
                    continue
                first = key[1] * CHUNK
                stop = min(first + CHUNK, node.data.count)
                found += self._chunk_bytes(node, first, stop)
                out.append((key[0], first, stop))
            for ino, first, _stop in out:
                del self.order[(ino, first // CHUNK)]
        return out

    @staticmethod
    def _chunk_bytes(node, first: int, stop: int) -> int:
        total = 0
        for i in range(first, stop):
            loc = node.data.get(i)
            if loc is not None and info_kind(loc[1]) is not BlockKind.ZERO and not is_plain(loc[0]):
                total += info_size(loc[1])
        return total

    def _release(self, victims: list[tuple[int, int, int]]) -> None:
        for ino, first, stop in victims:  # remember what goes, to count refetches
            node = self.image.ns.inodes[ino]
            bits = self.released.setdefault(ino, bytearray(-(-node.data.count // 8)))
            for i in range(first, stop):
                if node.data.is_present(i):
                    bits[i >> 3] |= 1 << (i & 7)
        blocks, punched = evict(self.image, victims)
        self.counters["blocks_released"] += blocks
        self.counters["bytes_released"] += punched
        self.counters["releases"] += 1

    def _gc_step(self) -> None:
        """Over the cap with nothing left to release: punch dead payload."""
        self._last_gc = time.monotonic()
        result = gc.collect(self.image, unlinked=False)
        self.counters["gc_runs"] += 1
        self.counters["gc_bytes"] += result.reclaimed

    def status(self) -> dict:
        allocated = holes.allocated(self.image.fd)
        self.peak = max(self.peak, allocated)
        return {"cache_size": self.cap, "allocated": allocated, "allocated_peak": self.peak,
                **self.counters}
