"""The running mount's state: one image, its waits and its counters.

FUSE reads, the control server and the built-in loader all come through here,
so every change takes the same path: checked and written by `Image` (in a
worker thread, one writer at a time, because it hashes and fsyncs), then
waiters are woken and the kernel's caches told.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Callable, Collection

import trio

from . import BLOCK_SIZE, __version__, block_dirents
from .errors import BadBlock, IntegrityError
from .format.records import TreeKind
from .image import FillBlock, FillResult, Image, MissingBlock
from .namespace import Inode
from .waits import ReaderGone, ReadTimedOut, Waits

THREAD_READ_MIN = 32 * 1024
READ_THREADS = 4


# Seconds after the mount is up that work waiting for its first read
# (Service.settled) starts anyway: a mount nobody reads yet still learns
# what it needs before a program comes.
SETTLE_WAIT = 0.5


class TailAbsent(Exception):
    """The first block of a read is here, later ones are not (see Service.read)."""


class Service:
    def __init__(self, image: Image, read_timeout: float | None):
        self.image = image
        self.waits = Waits(read_timeout)
        self.started = time.time()
        self.write_lock = trio.Lock()
        self._sync_lock = trio.Lock()
        self._written = self._synced = 0  # namespace changes written / synced
        # Writers (fills, namespace changes) take this one at a time; reads
        # need no lock (see BlockMap.set for why).
        self.image_lock = threading.Lock()
        self.read_threads = trio.CapacityLimiter(READ_THREADS)
        self.fuse = None  # the FUSE session (incfs.fuse.Session) once mounted
        self.restarts = 0  # daemons before this one on the same connection (supervisor.py)
        self.supervised = False
        self.warm_start = False  # forked by the warm process (incfs.warm)
        self.early_start = False  # forked by the command's early child (incfs.early_fork)
        # Set once the mount has reported ready: work that can wait (and would
        # take the GIL from the mount's start) waits for it.
        self.ready = trio.Event()
        # Set once a read has been served: work that takes the loop a while
        # after the start and can wait (the loader's source order: ~0.1 s at
        # a 1 GiB image) waits for it too (`settled`)
        self.first_read = trio.Event()
        self.passthrough = None  # incfs.passthrough.Passthrough when the kernel allows it
        self.space = None  # incfs.space.cap.CacheCap under --cache-size
        self.on_missing: Callable[[], None] = lambda: None
        self.counters = {"bytes_read": 0, "bytes_fetched": 0, "bytes_filled": 0,
                         "bytes_reused": 0, "reads": 0, "read_errors": 0,
                         "blocks_repaired": 0, "blocks_written": 0}
        # the last read that failed (issue 13's "last read error", incfs v2's
        # INCFS_IOC_GET_LAST_READ_ERROR): what a loader or an operator asks
        # first when a program reports EIO or ETIME
        self.last_read_error: dict | None = None
        self.source_errors: dict[str, int] = {}
        self.loader_status: dict = {}

    # --- reads (FUSE) ---------------------------------------------------------

    async def read(self, node: Inode, offset: int, size: int, reader_pid: int = 0,
                   spare_tail: bool = False, uid: int | None = None) -> bytes:
        if self.space is None:
            return await self._read(node, offset, size, reader_pid, spare_tail, uid)
        with self.space.pinned(node.ino, offset, size):  # the cap leaves these blocks be
            return await self._read(node, offset, size, reader_pid, spare_tail, uid)

    async def _read(self, node: Inode, offset: int, size: int, reader_pid: int = 0,
                    spare_tail: bool = False, uid: int | None = None) -> bytes:
        """Bytes of a file, waiting for absent blocks. Raises ReadTimedOut,
        ReaderGone or IntegrityError; never returns short or zero-filled data
        for a block that is not here.

        `spare_tail`: the range may be the kernel's readahead window, most of
        which no program asked for yet. When its first block is here but
        later ones are not, raise TailAbsent instead of waiting for them (the
        FUSE layer answers so that the kernel asks again for just the page
        it needs), unless that tail is on its way already (`_spares`). `uid`
        picks the reader's read timeout (Waits.timeout_for)."""
        end = min(node.size, offset + size)
        if offset >= end:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        logged = False
        repaired: set[tuple[int, int, int]] = set()
        while True:
            missing = self.image.missing_for_read(node, offset, size)
            if missing and spare_tail and self._spares(node, offset, size, missing):
                self.waits.spared(node.ino, first, last - first + 1)
                raise TailAbsent()
            if not logged:  # (a refused read is not logged: the kernel reads again)
                self.waits.log_read(node.ino, first, last)
                logged = True
            if missing:
                keys = [(node.ino, int(tree), index) for tree, index in missing]
                self.on_missing()
                await self.waits.wait_all(keys, reader_pid, uid)
                continue
            try:
                data = await self._read_present(node, offset, size)
            except MissingBlock:
                continue  # a hash block the cache had dropped: ask again
            except BadBlock as e:
                # bad bytes on disk (e.g. torn by a power cut): a cache can
                # fetch the block again, once; anything else fails the read
                key = (e.ino, e.tree, e.index)
                if key in repaired:
                    raise
                repaired.add(key)
                if self.image.forget_block(*key):
                    self.counters["blocks_repaired"] += 1
                elif self._block_present(*key):
                    raise
                continue  # (or it was released under us: fetch it again)
            self.counters["bytes_read"] += len(data)
            self.counters["reads"] += 1
            self.first_read.set()
            return data

    async def settled(self, longest: float = SETTLE_WAIT) -> None:
        """Once the mount is up and its first read served, or `longest`
        seconds after it is up if no program reads: for work that can wait
        and would hold the loop, which the first read would wait behind
        (it took 265 ms instead of 30 at 20 ms RTT, 1 GiB image)."""
        await self.ready.wait()
        with trio.move_on_after(longest):
            await self.first_read.wait()

    def _spares(self, node: Inode, offset: int, size: int,
                missing: list[tuple[TreeKind, int]]) -> bool:
        """Whether a read with `missing` blocks is refused for its tail: its
        first block is here, and some of the rest is not on its way yet.
        A tail a loader fetches already (a readahead or walk window) is
        waited for: the page reads a refusal brings would wait for the same
        blocks, one request per page, and the kernel quarters the file's
        readahead after each refused read (shrink_readahead_size_eio)."""
        if size <= BLOCK_SIZE or self.image.missing_for_read(node, offset, BLOCK_SIZE):
            return False
        fetching = self.waits.fetching
        return not all(fetching((node.ino, int(tree), index)) for tree, index in missing)

    def _block_present(self, ino: int, tree: int, index: int) -> bool:
        node = self.image.ns.inodes[ino]
        target = node.data if tree == TreeKind.DATA else node.hashes
        return target is not None and target.is_present(index)

    async def _read_present(self, node: Inode, offset: int, size: int) -> bytes:
        """Large reads go to worker threads so disk waits, hashing and
        decompression (which release the GIL) overlap on both cores; small
        ones stay inline, where a thread hop would cost more than the read."""
        if size < THREAD_READ_MIN:
            return self.image.read_range(node, offset, size)
        return await trio.to_thread.run_sync(self.image.read_range, node, offset, size,
                                             limiter=self.read_threads)

    # --- changes (control protocol, loaders) -----------------------------------

    async def fill(self, ino: int, blocks: list[FillBlock], fetched: bool = False,
                   reused: bool = False, leaves: Collection[int] = ()) -> FillResult:
        """Store blocks and wake their waiters. `fetched`: the bytes came over
        the network (bytes_fetched); `reused`: copied from an older local
        image (bytes_reused); neither: handed in by a loader (bytes_filled).
        `leaves`: leaf hash blocks to build from the data (see Image.fill)."""
        before = self.image.ns.inodes.get(ino)
        was_complete = before is None or before.complete
        async with self.write_lock:
            result = await trio.to_thread.run_sync(self._fill_locked, ino, blocks, leaves)
        self.counters["blocks_written"] += result.stored
        node = self.image.ns.inodes[ino]
        for blk in blocks:
            tree = int(blk.tree)
            target = node.data if blk.tree == TreeKind.DATA else node.hashes
            if target is not None and 0 <= blk.index < target.count and target.is_present(blk.index):
                self.waits.filled((ino, tree, blk.index))
        for leaf in result.leaves_built:
            self.waits.filled((ino, int(TreeKind.HASH), leaf))
        size = sum(len(b.data) for b in blocks)
        self.counters["bytes_reused" if reused else
                      "bytes_fetched" if fetched else "bytes_filled"] += size
        node = self.image.ns.inodes.get(ino)
        if node is not None and node.complete and not was_complete:
            await self._completed(node)
        if self.passthrough is not None and node is not None and node.complete:
            # the file just arrived whole: expand it now, so that its next
            # open is the kernel's, not the daemon's (queued once per file)
            self.passthrough.file_completed(node)
        return result

    async def _completed(self, node: Inode) -> None:
        """A file just got its last block: its `.incfs/incomplete` entry
        goes, and the kernel is told (see IncfsOperations.file_completed)."""
        forget = self.fuse.ops.file_completed(node) if self.fuse is not None else None
        if forget is not None:
            await trio.to_thread.run_sync(forget)

    def note_read_error(self, node: Inode, block: int, code: int, why: str,
                        uid: int | None) -> None:
        self.last_read_error = {
            "ino": node.ino, "file_id": node.file_id.hex(), "block": block, "errno": code,
            "error": errno.errorcode.get(code, str(code)), "why": why,
            "uid": uid, "time_ns": time.time_ns()}

    def _fill_locked(self, ino: int, blocks: list[FillBlock],
                     leaves: Collection[int] = ()) -> FillResult:
        with self.image_lock:
            if self.space is not None:
                # room first: the cap holds at all times (with a block for
                # each leaf hash block the fill may build)
                self.space.before_fill(blocks, extra=len(leaves) * BLOCK_SIZE)
            result = self.image.fill(ino, blocks, leaves)
            if self.space is not None:
                self.space.after_fill(ino, blocks)
            return result

    async def change(self, fn: Callable, *args, **kwargs):
        """Run a namespace change of `Image` (create, link, unlink) safely.

        Durable before it returns, by group commit: the change is written
        without a sync under the write lock, then one fdatasync covers every
        change written so far, so concurrent loaders share syncs instead of
        paying two each (a create writes an inode and a name)."""
        async with self.write_lock:
            def locked():
                with self.image_lock:
                    durable, self.image.durable = self.image.durable, False
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        self.image.durable = durable
            result = await trio.to_thread.run_sync(locked)
            self._written += 1
            generation = self._written
        if self.image.durable:
            await self._sync_through(generation)
        return result

    async def _sync_through(self, generation: int) -> None:
        async with self._sync_lock:
            if self._synced >= generation:
                return  # a sync that started after our write covered it
            target = self._written
            await trio.to_thread.run_sync(os.fdatasync, self.image.fd)
            self._synced = target

    async def unlink(self, parent: int, name: bytes) -> None:
        await self.change(self.image.unlink, parent, name)
        # the kernel may hold the name for an hour: forget it before answering
        await self._names_changed(parent, name)

    async def link(self, child: int, parent: int, name: bytes) -> None:
        await self.change(self.image.link, child, parent, name)
        await self._names_changed(parent, name)

    async def create(self, parent: int, name: bytes, mode: int, **kw) -> int:
        ino = await self.change(self.image.create_node, parent, name, mode, **kw)
        await self._names_changed(parent, name)
        tell = self.fuse.ops.created(self.image.ns.inodes[ino]) if self.fuse is not None else None
        if tell is not None:
            await trio.to_thread.run_sync(tell)
        return ino

    async def _names_changed(self, parent: int, name: bytes) -> None:
        """The kernel caches names (an hour) and listings (FOPEN_CACHE_DIR):
        make it forget both before the change is acknowledged. Notifications
        can block on the directory's lock, so a worker thread sends them."""
        if self.fuse is None:
            return
        self.fuse.ops.names_changed(parent)

        def forget() -> None:
            self.fuse.invalidate_entry_now(parent, name)
            self.fuse.invalidate_inode_now(parent, 0, 0)
        await trio.to_thread.run_sync(forget)

    # --- status ----------------------------------------------------------------

    def status(self) -> dict:
        totals = self.image.totals()
        complete = totals["blocks_present"] == totals["blocks_total"]
        return {
            **totals,
            "complete": complete,
            "pending_reads": len(self.waits.pending),
            "bytes_fetched": self.counters["bytes_fetched"],
            "bytes_filled": self.counters["bytes_filled"],
            "bytes_read": self.counters["bytes_read"],
            "bytes_reused": self.counters["bytes_reused"],
            "reads": self.counters["reads"],
            "misses": self.waits.counters["misses"],
            "miss_latency": self.waits.latency_percentiles(),
            "timeouts": self.waits.counters["timeouts"],
            "reads_failed": self.waits.counters["failed"],
            "reads_abandoned": self.waits.counters["reads_abandoned"],
            "verify_failures": self.image.counters["verify_failures"],
            "read_errors": self.counters["read_errors"],
            "blocks_written": self.counters["blocks_written"],
            "last_read_error": self.last_read_error,
            "blocks_repaired": self.counters["blocks_repaired"],
            "source_errors": dict(self.source_errors),
            "loader": dict(self.loader_status),
            **({"space": self.space.status()} if self.space is not None else {}),
            "signed": self.image.signature is not None,
            "image": str(self.image.path),
            "read_timeout": self.waits.read_timeout,
            # JSON keys are strings; None: that uid's reads wait forever
            "read_timeouts": {str(uid): t for uid, t in sorted(self.waits.uid_timeouts.items())},
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "restarts": self.restarts,
            "warm_start": self.warm_start,
            "early_start": self.early_start,
            "supervisor_pid": os.getppid() if self.supervised else None,
            "version": __version__,
            "fuse": self._fuse_status(),
        }

    def _fuse_status(self) -> dict:
        """Which kernel paths this mount uses, and requests by opcode (so a
        second pass can be shown to reach the daemon almost never)."""
        session = self.fuse
        if session is None or session.conn is None:
            return {}
        conn = session.conn
        return {
            "protocol": f"7.{conn.minor}",
            "io_mode": "passthrough" if self.passthrough is not None else "daemon",
            # who turns name blocks into READDIR records (incfs.block_dirents)
            "listing_encoder": "c" if block_dirents.NATIVE else "python",
            "notes": list(conn.notes),
            "requests": dict(session.counts),
            "errors": dict(session.errors),
            **({"passthrough": self.passthrough.status()} if self.passthrough else {}),
        }


__all__ = ["Service", "ReadTimedOut", "ReaderGone", "IntegrityError", "TailAbsent"]
