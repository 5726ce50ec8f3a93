"""One FUSE connection served on trio: read requests from /dev/fuse, answer
them through an `Operations`, send notifications.

Requests are read by one task. Everything but READ is answered inline (the
answers come from memory, and a task per request would cost more than the
work); READ may wait for a block still arriving, so it runs in a task of its
own with a cancel scope that FUSE_INTERRUPT cancels. Replies are single
write(2)s, which /dev/fuse takes whole and never blocks on.

Notifications (invalidations, stores) can block inside the kernel on an
inode lock held by a request that waits for us, so they are only ever sent
from worker threads (the `*_now` methods) or handed to one (the async ones).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import time
from collections import Counter
from typing import Callable

import trio

from . import abi, device
from .abi import InitFlag, Op
from .ops import Connection, Context, FuseError, Operations, pack_attr_out

log = logging.getLogger("incfs.fuse")

MAX_PAGES = 256                      # 1 MiB requests (the kernel's default limit)
MAX_WRITE = 128 * 1024               # read-only: no writes come, but the kernel wants a size
BUFFER_SIZE = MAX_WRITE + 64 * 1024  # a request plus its header, names and xattr values
MAX_BACKGROUND = 64                  # readahead requests in flight (the kernel's default: 12)
CONGESTION_THRESHOLD = 48
YIELD_EVERY = 32                     # inline answers between checkpoints, so other tasks run
# After the queue runs dry, keep trying to read for this long before sleeping
# in epoll: a program that opens, ioctls and closes a file sends its next
# request a few microseconds after our reply, and a trip through trio's epoll
# wait (register, wait, unregister, reschedule) costs more than the request.
SPIN_NS = 50_000
# READDIRPLUS_AUTO makes the kernel ask for plus at offset 0 of every
# directory, and afterwards only when the names it got were looked at (a
# stat of an entry that plus made sets FUSE_I_ADVISE_RDPLUS on the directory).
# A walk that only needs names and types (ls -R, find) would pay for a full
# 32 KiB of plus entries per directory, each an inode the kernel makes; so
# the first reply carries files only in its first KiB: a stat-ing walk (ls -l,
# du) gets plus for the rest all the same, one request later. Directories
# go on filling it: a walk goes into each, and a plus entry is much cheaper
# than the LOOKUP it would send instead.
FIRST_PLUS_FILES = 1024

WANTED = (InitFlag.ASYNC_READ | InitFlag.PARALLEL_DIROPS | InitFlag.DO_READDIRPLUS
          | InitFlag.READDIRPLUS_AUTO | InitFlag.MAX_PAGES | InitFlag.CACHE_SYMLINKS
          | InitFlag.EXPLICIT_INVAL_DATA | InitFlag.ABORT_ERROR | InitFlag.INIT_EXT
          | InitFlag.NO_EXPORT_SUPPORT | InitFlag.POSIX_ACL)
"""Why each: ASYNC_READ lets readahead run several requests at once;
PARALLEL_DIROPS lets lookups and readdirs of one directory run together;
READDIRPLUS (auto) fills the kernel's attribute cache while listing;
MAX_PAGES gives 1 MiB reads; CACHE_SYMLINKS keeps link targets in the page
cache; EXPLICIT_INVAL_DATA because content never changes (no AUTO_INVAL_DATA:
the kernel must not drop cached pages when it sees an mtime);
ABORT_ERROR tells an aborted connection from an unmount; POSIX_ACL makes the
kernel enforce the ACLs an image stores (system.posix_acl_* xattrs), as it
does the mode bits (default_permissions). PASSTHROUGH is
added by the caller that can use it."""


class Session:
    def __init__(self, fd: int, ops: Operations, *, passthrough: bool = False):
        self.fd = fd
        self.ops = ops
        self.want_passthrough = passthrough
        self.conn: Connection | None = None
        self.connected = trio.Event()  # set once INIT is answered
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._tasks: dict[int, trio.CancelScope] = {}
        self._buffer = bytearray(BUFFER_SIZE)
        self._handlers: dict[int, Callable] = {
            Op.LOOKUP: self._lookup, Op.FORGET: self._forget, Op.BATCH_FORGET: self._batch_forget,
            Op.GETATTR: self._getattr, Op.READLINK: self._readlink, Op.OPEN: self._open, Op.READ: self._read,
            Op.RELEASE: self._release, Op.OPENDIR: self._opendir, Op.READDIR: self._readdir,
            Op.READDIRPLUS: self._readdirplus, Op.RELEASEDIR: self._releasedir,
            Op.STATFS: self._statfs, Op.GETXATTR: self._getxattr, Op.LISTXATTR: self._listxattr,
            Op.ACCESS: self._access, Op.FLUSH: self._flush, Op.INTERRUPT: self._interrupt,
            Op.DESTROY: self._destroy, Op.INIT: self._init,
        }
        self._done = False
        self._idle_failed = False

    # --- the loop -------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the file system is unmounted (or the connection aborted)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            served = 0
            while not self._done:
                n = await self._receive()
                if n is None:
                    break
                self._dispatch(memoryview(self._buffer)[:n])
                served += 1
                if served % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()

    async def _receive(self) -> int | None:
        while True:
            try:
                return os.readv(self.fd, [self._buffer])
            except BlockingIOError:
                if self._idle():
                    await trio.lowlevel.checkpoint()  # READ tasks run between pieces
                    continue
                if self._spin():
                    continue
                await trio.lowlevel.wait_readable(self.fd)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                    log.info("FUSE connection closed (%s)", os.strerror(e.errno))
                    return None
                raise

    def _idle(self) -> bool:
        """The file system's work between requests (see Operations.idle):
        optional, so a failure is logged and that is all."""
        if self._idle_failed:
            return False
        try:
            return self.ops.idle()
        except Exception:
            self.errors["idle_crash"] += 1
            self._idle_failed = True  # once: it would fail again at every pause
            log.exception("work between requests failed; no more of it")
            return False

    def _spin(self) -> bool:
        """True once a request is waiting (within SPIN_NS), False if none came."""
        deadline = time.perf_counter_ns() + SPIN_NS
        fds = [self.fd]
        while time.perf_counter_ns() < deadline:
            if select.select(fds, (), (), 0)[0]:
                return True
        return False

    def _dispatch(self, req: memoryview) -> None:
        if len(req) < abi.IN_HEADER.size:
            self.errors["short_request"] += 1
            return
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.IN_HEADER.unpack_from(req)
        body = req[abi.IN_HEADER.size:min(length, len(req)) - extlen * 8]
        name = _op_name(opcode)
        self.counts[name] += 1
        handler = self._handlers.get(opcode)
        if self.conn is None and opcode != Op.INIT:
            self._error(unique, errno.EIO)
            return
        if handler is None:
            self._error(unique, errno.EROFS if opcode in abi.MODIFYING else errno.ENOSYS)
            return
        ctx = Context(uid, gid, pid, unique)
        try:
            handler(nodeid, body, ctx)
        except FuseError as e:
            self._error(unique, e.errno)
        except (struct.error, ValueError, IndexError) as e:
            self.errors["bad_request"] += 1
            log.warning("malformed %s request (%d bytes): %s", name, length, e)
            self._error(unique, errno.EINVAL)
        except OSError as e:
            self._error(unique, e.errno or errno.EIO)
        except Exception:
            self.errors["handler_crash"] += 1
            log.exception("%s failed", name)
            self._error(unique, errno.EIO)

    # --- replies ----------------------------------------------------------------

    def reply(self, unique: int, payload: bytes | memoryview = b"") -> None:
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique)
        self._write(unique, [header, payload] if payload else [header])

    def _error(self, unique: int, code: int) -> None:
        if unique == 0:
            return  # FORGET and friends take no reply
        self._write(unique, [abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -code, unique)])

    def _write(self, unique: int, parts: list) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return  # the caller is gone (interrupted): nobody waits for this
            self.errors["reply_refused"] += 1
            log.warning("kernel refused the reply to request %d: %s", unique, e)
            if len(parts) > 1 or (len(parts) == 1 and len(parts[0]) > abi.OUT_HEADER.size):
                self._error(unique, errno.EIO)  # so the caller is not left waiting

    # --- INIT -------------------------------------------------------------------

    def _init(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        major, minor, max_readahead, flags = abi.INIT_IN_OLD.unpack_from(body)
        if major != abi.KERNEL_MAJOR:
            # the header says: answer with our major and wait for a new INIT
            self.reply(ctx.unique, abi.INIT_OUT.pack(abi.KERNEL_MAJOR, abi.OUR_MINOR,
                                                     *([0] * 11)))
            return
        kernel_flags = InitFlag(flags)
        if flags & InitFlag.INIT_EXT and len(body) >= abi.INIT_IN.size:
            kernel_flags |= InitFlag(abi.INIT_IN.unpack_from(body)[4] << 32)
        conn = self._negotiate(minor, max_readahead, kernel_flags)
        flags_out = int(conn.flags)
        reply = abi.INIT_OUT.pack(
            abi.KERNEL_MAJOR, conn.minor, max_readahead, flags_out & 0xFFFFFFFF,
            MAX_BACKGROUND, CONGESTION_THRESHOLD, MAX_WRITE, 1, conn.max_pages, 0,
            flags_out >> 32, 1 if conn.passthrough else 0, 0)
        if conn.minor < 23:
            reply = reply[:24]  # FUSE_COMPAT_22_INIT_OUT_SIZE
        self.conn = conn
        self.ops.init(conn)
        self.reply(ctx.unique, reply)
        self.connected.set()
        log.info("FUSE %d.%d, flags %s%s", abi.KERNEL_MAJOR, conn.minor, _flag_names(conn.flags),
                 "".join(f"; {n}" for n in conn.notes))

    def _negotiate(self, minor: int, max_readahead: int, offered: InitFlag) -> Connection:
        minor = min(minor, abi.OUR_MINOR)
        notes = []
        if minor < abi.OLDEST_MINOR:
            notes.append(f"kernel protocol 7.{minor} is older than 7.{abi.OLDEST_MINOR}: "
                         "no 1 MiB requests, directory or symlink caching")
        wanted = WANTED
        if self.want_passthrough:
            wanted |= InitFlag.PASSTHROUGH
        flags = offered & wanted
        if self.want_passthrough and not flags & InitFlag.PASSTHROUGH:
            notes.append("the kernel offers no FUSE passthrough (CONFIG_FUSE_PASSTHROUGH, "
                         "protocol 7.40): complete files are served by the daemon")
        if not offered & InitFlag.INIT_EXT:
            flags &= InitFlag(0xFFFFFFFF)
        max_pages = MAX_PAGES if flags & InitFlag.MAX_PAGES else 32
        return Connection(minor=minor, flags=flags, max_readahead=max_readahead,
                          max_pages=max_pages, passthrough=bool(flags & InitFlag.PASSTHROUGH),
                          notes=notes)

    def resume(self, conn: Connection) -> None:
        """Take over a connection another process negotiated (the kernel sent
        its INIT to that one), then ask the kernel to send again every
        request that process had read but not answered (FUSE_NOTIFY_RESEND,
        7.40): they come back with RESEND_BIT in `unique`, and replies echo
        it. Call before `run`."""
        self.conn = conn
        self.ops.init(conn)
        self.connected.set()
        if conn.minor >= 40:
            self._notify(abi.Notify.RESEND, b"")
        else:
            conn.notes.append(f"protocol 7.{conn.minor} cannot resend requests a dead daemon "
                              "had read: their callers wait until the connection ends")

    def _destroy(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.ops.destroy()
        self.reply(ctx.unique)
        self._done = True

    # --- names and attributes -----------------------------------------------------

    def _lookup(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        name = _cstring(body)
        self.reply(ctx.unique, self.ops.lookup(nodeid, name, ctx).pack())

    def _forget(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.ops.forget([(nodeid, abi.FORGET_IN.unpack_from(body)[0])])

    def _batch_forget(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
        size = abi.FORGET_ONE.size
        start = abi.BATCH_FORGET_IN.size
        count = min(count, (len(body) - start) // size)
        self.ops.forget([abi.FORGET_ONE.unpack_from(body, start + i * size) for i in range(count)])

    def _getattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        attr, timeout = self.ops.getattr(nodeid, ctx)
        self.reply(ctx.unique, pack_attr_out(attr, timeout))

    def _readlink(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.reply(ctx.unique, self.ops.readlink(nodeid, ctx))

    def _access(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        mask, _ = abi.ACCESS_IN.unpack_from(body)
        self.ops.access(nodeid, mask, ctx)
        self.reply(ctx.unique)

    def _statfs(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.reply(ctx.unique, self.ops.statfs(nodeid, ctx).pack())

    def _getxattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        value = self.ops.getxattr(nodeid, _cstring(body[abi.GETXATTR_IN.size:]), ctx)
        self._sized_reply(ctx.unique, size, value)

    def _listxattr(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        names = self.ops.listxattr(nodeid, ctx)
        self._sized_reply(ctx.unique, size, b"".join(n + b"\0" for n in names))

    def _sized_reply(self, unique: int, size: int, value: bytes) -> None:
        """getxattr/listxattr: size 0 asks how big; too small a buffer: ERANGE."""
        if size == 0:
            self.reply(unique, abi.GETXATTR_OUT.pack(len(value), 0))
        elif len(value) > size:
            self._error(unique, errno.ERANGE)
        else:
            self.reply(unique, value)

    # --- files ----------------------------------------------------------------------

    def _open(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        opened = self.ops.open(nodeid, flags, ctx)
        self.reply(ctx.unique, abi.OPEN_OUT.pack(opened.fh, int(opened.flags), opened.backing_id))

    def _release(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh = abi.RELEASE_IN.unpack_from(body)[0]
        self.ops.release(nodeid, fh)
        self.reply(ctx.unique)

    def _flush(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.ops.flush(nodeid, abi.FLUSH_IN.unpack_from(body)[0], ctx)
        self.reply(ctx.unique)

    def _read(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        fh, offset, size = abi.READ_IN.unpack_from(body)[:3]
        scope = trio.CancelScope()
        self._tasks[ctx.unique] = scope
        self._nursery.start_soon(self._read_task, nodeid, fh, offset, size, ctx, scope)

    async def _read_task(self, nodeid: int, fh: int, offset: int, size: int, ctx: Context,
                         scope: trio.CancelScope) -> None:
        try:
            with scope:
                data = await self.ops.read(nodeid, fh, offset, size, ctx)
                self.reply(ctx.unique, data)
                return
            self.counts["interrupted"] += 1
            self._error(ctx.unique, errno.EINTR)
        except FuseError as e:
            self._error(ctx.unique, e.errno)
        except OSError as e:
            self._error(ctx.unique, e.errno or errno.EIO)
        except Exception:
            self.errors["handler_crash"] += 1
            log.exception("READ failed")
            self._error(ctx.unique, errno.EIO)
        finally:
            self._tasks.pop(ctx.unique, None)

    def _interrupt(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        """No reply: the interrupted request itself answers EINTR."""
        target = abi.INTERRUPT_IN.unpack_from(body)[0]
        scope = self._tasks.get(target)
        if scope is not None:
            scope.cancel()

    # --- directories ----------------------------------------------------------------

    def _opendir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        opened = self.ops.opendir(nodeid, flags, ctx)
        self.reply(ctx.unique, abi.OPEN_OUT.pack(opened.fh, int(opened.flags), 0))

    def _releasedir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self.ops.releasedir(nodeid, abi.RELEASE_IN.unpack_from(body)[0])
        self.reply(ctx.unique)

    def _readdir(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self._list(nodeid, body, ctx, plus=False)

    def _readdirplus(self, nodeid: int, body: memoryview, ctx: Context) -> None:
        self._list(nodeid, body, ctx, plus=True)

    def _list(self, nodeid: int, body: memoryview, ctx: Context, plus: bool) -> None:
        fh, offset, size = abi.READ_IN.unpack_from(body)[:3]
        listing = self.ops.listing(nodeid, fh, offset, ctx)
        if not plus:
            self.reply(ctx.unique, listing.plain(offset, size))
            return
        self.reply(ctx.unique, listing.plus(offset, size,
                                            lambda ino, d_type: self.ops.listed_entry(
                                                ino, d_type, ctx),
                                            FIRST_PLUS_FILES if offset == 0 else None))

    # --- notifications (worker threads only: they may block in the kernel) -------------

    def invalidate_entry_now(self, parent: int, name: bytes) -> None:
        """Make the kernel forget a name; ENOENT (it did not know it) is fine."""
        payload = abi.NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
        self._notify(abi.Notify.INVAL_ENTRY, payload)

    def delete_entry_now(self, parent: int, child: int, name: bytes) -> None:
        """Tell the kernel a name is gone (FUSE_NOTIFY_DELETE): like
        invalidate_entry_now, and the child inode is unlinked in the kernel
        (its link count drops to 0), so inotify watchers of the child see
        IN_DELETE_SELF. ENOENT (the kernel did not know the name) is fine."""
        payload = abi.NOTIFY_DELETE.pack(parent, child, len(name), 0) + name + b"\0"
        self._notify(abi.Notify.DELETE, payload)

    def invalidate_inode_now(self, ino: int, offset: int = 0, length: int = 0) -> None:
        """Drop cached attributes and, for offset >= 0, cached pages (length
        0: to the end)."""
        self._notify(abi.Notify.INVAL_INODE, abi.NOTIFY_INVAL_INODE.pack(ino, offset, length))

    def store_now(self, ino: int, offset: int, data: bytes) -> None:
        """Put data straight into the kernel's page cache for an inode."""
        self._notify(abi.Notify.STORE, abi.NOTIFY_STORE.pack(ino, offset, len(data), 0) + data)

    def _notify(self, code: abi.Notify, payload: bytes) -> None:
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), int(code), 0)
        try:
            os.writev(self.fd, [header, payload] if payload else [header])
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENOTCONN):
                raise

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        await trio.to_thread.run_sync(self.invalidate_entry_now, parent, name)

    def invalidate_entry_soon(self, parent: int, name: bytes) -> None:
        """Fire and forget from the trio thread."""
        self._nursery.start_soon(self.invalidate_entry, parent, name)

    # --- passthrough ------------------------------------------------------------------

    def backing_open(self, file_fd: int) -> int:
        return device.backing_open(self.fd, file_fd)

    def backing_close(self, backing_id: int) -> None:
        device.backing_close(self.fd, backing_id)


def _cstring(body: memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("name without a terminating NUL")
    return raw[:end]


_OP_NAMES = {op.value: op.name for op in Op}


def _op_name(opcode: int) -> str:
    """The opcode's name, for the counters (a dict look-up: every request pays it)."""
    return _OP_NAMES.get(opcode) or f"OP_{opcode}"


def _flag_names(flags: InitFlag) -> str:
    return "|".join(f.name for f in InitFlag if f in flags and f.name) or "none"
