"""incfs.fuse.Session against hand-made requests.

A SOCK_SEQPACKET socket pair stands in for /dev/fuse: like the device, each
read returns one whole request and each write takes one whole reply. The
kernel side is played by the test, so malformed requests (which a real
kernel never sends) can be tried too. Real-mount behaviour is in
test_fuse_mount.py.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

import trio

from incfs.fuse import Attr, Connection, Entry, FuseError, InitFlag, Listing, Opened
from incfs.fuse import Operations, Session, abi

KERNEL_FLAGS = int(InitFlag.ASYNC_READ | InitFlag.MAX_PAGES | InitFlag.DO_READDIRPLUS
                   | InitFlag.CACHE_SYMLINKS | InitFlag.INIT_EXT | InitFlag.PARALLEL_DIROPS
                   | InitFlag.AUTO_INVAL_DATA | InitFlag.PASSTHROUGH)


class ToyFS(Operations):
    """Root (1) holds `file` (2, 10 bytes) and `slow` (3, whose read waits)."""

    def __init__(self):
        self.conn: Connection | None = None
        self.read_started = trio.Event()
        self.read_cancelled = False

    def init(self, conn):
        self.conn = conn

    def _attr(self, ino):
        if ino == 1:
            return Attr(ino=1, mode=stat.S_IFDIR | 0o555, nlink=2)
        return Attr(ino=ino, mode=stat.S_IFREG | 0o444, size=10)

    def lookup(self, parent, name, ctx):
        inos = {b"file": 2, b"slow": 3}
        if parent != 1 or name not in inos:
            raise FuseError(errno.ENOENT)
        return Entry(self._attr(inos[name]), 60.0, 60.0)

    def getattr(self, ino, ctx):
        return self._attr(ino), 60.0

    def open(self, ino, flags, ctx):
        return Opened(ino, abi.OpenFlag.KEEP_CACHE)

    async def read(self, ino, fh, offset, size, ctx):
        if ino == 3:
            self.read_started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.read_cancelled = True
                raise
        return b"0123456789"[offset:offset + size]

    def opendir(self, ino, flags, ctx):
        return Opened(7, abi.OpenFlag.CACHE_DIR)

    def listing(self, ino, fh, offset, ctx):
        names = [f"name{i:03d}".encode() for i in range(100)]
        return Listing(names, [2] * len(names), bytes([stat.S_IFREG >> 12]) * len(names))

    def getxattr(self, ino, name, ctx):
        if name == b"user.x":
            return b"value"
        raise FuseError(errno.ENODATA)


def request(opcode: int, unique: int, nodeid: int = 1, body: bytes = b"") -> bytes:
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, unique, nodeid,
                              0, 0, os.getpid(), 0, 0) + body


def init_body(minor: int = 45, flags: int = KERNEL_FLAGS) -> bytes:
    return abi.INIT_IN.pack(7, minor, 128 * 1024, flags & 0xFFFFFFFF, flags >> 32)


class Kernel:
    """The test's end of the pair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    async def send(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self.sock.send, data)

    async def reply(self) -> tuple[int, int, bytes]:
        with trio.fail_after(10):
            data = await trio.to_thread.run_sync(self.sock.recv, 1 << 21)
        length, error, unique = abi.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[abi.OUT_HEADER.size:]

    async def call(self, opcode, unique, nodeid=1, body=b""):
        await self.send(request(opcode, unique, nodeid, body))
        got_unique, error, payload = await self.reply()
        assert got_unique == unique
        return error, payload


async def with_session(fs: Operations, test, *, init: bytes | None = None,
                       passthrough: bool = False):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    session = Session(ours.fileno(), fs, passthrough=passthrough)
    kernel = Kernel(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        if init is not False:
            error, payload = await kernel.call(abi.Op.INIT, 1, body=init or init_body())
            assert error == 0
        await test(kernel, session)
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


def test_init_negotiates_only_what_we_want_and_the_kernel_offers():
    fs = ToyFS()

    async def check(kernel, session):
        assert fs.conn is not None
        flags = fs.conn.flags
        assert InitFlag.MAX_PAGES in flags and InitFlag.CACHE_SYMLINKS in flags
        assert InitFlag.AUTO_INVAL_DATA not in flags  # content never changes
        assert InitFlag.PASSTHROUGH not in flags      # not asked for
        assert fs.conn.max_pages == 256 and fs.conn.minor == 45

    trio.run(with_session, fs, check)


def test_init_reply_layout():
    async def run():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        session = Session(ours.fileno(), ToyFS(), passthrough=True)
        kernel = Kernel(theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            error, payload = await kernel.call(abi.Op.INIT, 1, body=init_body())
            assert error == 0 and len(payload) == abi.INIT_OUT.size
            fields = abi.INIT_OUT.unpack(payload)
            major, minor, readahead, flags = fields[:4]
            max_pages, flags2, stack_depth = fields[8], fields[10], fields[11]
            assert (major, minor, readahead, max_pages) == (7, 45, 128 * 1024, 256)
            assert flags2 << 32 & InitFlag.PASSTHROUGH and stack_depth == 1
            assert session.conn.passthrough
            nursery.cancel_scope.cancel()

    trio.run(run)


def test_old_kernel_minor_degrades_with_a_note():
    fs = ToyFS()
    old_flags = int(InitFlag.ASYNC_READ | InitFlag.DO_READDIRPLUS)

    async def check(kernel, session):
        assert fs.conn.minor == 27
        assert fs.conn.max_pages == 32 and InitFlag.MAX_PAGES not in fs.conn.flags
        assert any("older than" in n for n in fs.conn.notes)
        assert any("passthrough" in n for n in fs.conn.notes)

    trio.run(lambda: with_session(fs, check, init=abi.INIT_IN_OLD.pack(7, 27, 65536, old_flags),
                                  passthrough=True))


def test_requests_before_init_fail_cleanly():
    async def check(kernel, session):
        error, _ = await kernel.call(abi.Op.GETATTR, 5, body=abi.GETATTR_IN.pack(0, 0, 0))
        assert error == -errno.EIO

    trio.run(lambda: with_session(ToyFS(), check, init=False))


def test_unknown_and_modifying_opcodes():
    async def check(kernel, session):
        assert (await kernel.call(9999, 2))[0] == -errno.ENOSYS
        assert (await kernel.call(abi.Op.MKDIR, 3, body=b"\0" * 8 + b"x\0"))[0] == -errno.EROFS
        assert (await kernel.call(abi.Op.WRITE, 4, body=b"\0" * 40))[0] == -errno.EROFS
        assert (await kernel.call(abi.Op.SETXATTR, 5, body=b"\0" * 16))[0] == -errno.EROFS
        # and the session still answers
        error, payload = await kernel.call(abi.Op.LOOKUP, 6, body=b"file\0")
        assert error == 0 and abi.ENTRY_OUT_HEAD.unpack_from(payload)[0] == 2
        assert session.counts["OP_9999"] == 1

    trio.run(with_session, ToyFS(), check)


def test_malformed_requests_get_einval_not_a_dead_session():
    async def check(kernel, session):
        assert (await kernel.call(abi.Op.READ, 2, 2, body=b"\0" * 7))[0] == -errno.EINVAL
        assert (await kernel.call(abi.Op.LOOKUP, 3, body=b"no-nul"))[0] == -errno.EINVAL
        assert (await kernel.call(abi.Op.GETXATTR, 4, body=b"\0"))[0] == -errno.EINVAL
        # a header that claims more than was sent
        raw = bytearray(request(abi.Op.GETATTR, 5, 2, abi.GETATTR_IN.pack(0, 0, 0)))
        struct.pack_into("=I", raw, 0, 4096)
        await kernel.send(bytes(raw))
        unique, error, _ = await kernel.reply()
        assert unique == 5 and error == 0  # the bytes that came are enough for GETATTR
        assert session.errors["bad_request"] == 3
        assert (await kernel.call(abi.Op.GETATTR, 6, 2, abi.GETATTR_IN.pack(0, 0, 0)))[0] == 0

    trio.run(with_session, ToyFS(), check)


def test_getattr_and_lookup_carry_attributes_and_timeouts():
    async def check(kernel, session):
        error, payload = await kernel.call(abi.Op.GETATTR, 2, 2, abi.GETATTR_IN.pack(0, 0, 0))
        valid, nsec, _ = abi.ATTR_OUT_HEAD.unpack_from(payload)
        attr = abi.ATTR.unpack_from(payload, abi.ATTR_OUT_HEAD.size)
        assert error == 0 and valid == 60 and attr[0] == 2 and attr[1] == 10
        assert stat.S_ISREG(attr[9])
        error, _ = await kernel.call(abi.Op.LOOKUP, 3, body=b"missing\0")
        assert error == -errno.ENOENT

    trio.run(with_session, ToyFS(), check)


def test_read_and_interrupt():
    fs = ToyFS()

    async def check(kernel, session):
        error, data = await kernel.call(abi.Op.READ, 2, 2, abi.READ_IN.pack(2, 3, 4, 0, 0, 0, 0))
        assert (error, data) == (0, b"3456")
        await kernel.send(request(abi.Op.READ, 10, 3, abi.READ_IN.pack(3, 0, 4, 0, 0, 0, 0)))
        await fs.read_started.wait()
        await kernel.send(request(abi.Op.INTERRUPT, 11, 0, abi.INTERRUPT_IN.pack(10)))
        unique, error, _ = await kernel.reply()
        assert (unique, error) == (10, -errno.EINTR) and fs.read_cancelled
        assert session.counts["interrupted"] == 1
        # an interrupt for a request that is already answered is ignored
        await kernel.send(request(abi.Op.INTERRUPT, 12, 0, abi.INTERRUPT_IN.pack(2)))
        assert (await kernel.call(abi.Op.GETATTR, 13, 2, abi.GETATTR_IN.pack(0, 0, 0)))[0] == 0

    trio.run(with_session, fs, check)


def test_readdir_fills_the_buffer_and_resumes_at_the_offset():
    async def check(kernel, session):
        for opcode, plus in ((abi.Op.READDIR, False), (abi.Op.READDIRPLUS, True)):
            names, offset, unique = [], 0, 100
            while True:
                unique += 1
                error, data = await kernel.call(opcode, unique, 1,
                                                abi.READ_IN.pack(7, offset, 1000, 0, 0, 0, 0))
                assert error == 0 and len(data) <= 1000
                if not data:
                    break
                pos = 0
                while pos < len(data):
                    head = pos + (abi.ENTRY_OUT_SIZE if plus else 0)
                    ino, off, namelen, dtype = abi.DIRENT_HEAD.unpack_from(data, head)
                    start = head + abi.DIRENT_HEAD.size
                    names.append(data[start:start + namelen])
                    assert ino == 2 and dtype == stat.S_IFREG >> 12
                    pos += abi.dirent_size(namelen, plus)
                    offset = off
            assert names == [f"name{i:03d}".encode() for i in range(100)]

    trio.run(with_session, ToyFS(), check)


def test_getxattr_size_query_and_erange():
    def body(size, name):
        return abi.GETXATTR_IN.pack(size, 0) + name + b"\0"

    async def check(kernel, session):
        error, payload = await kernel.call(abi.Op.GETXATTR, 2, 2, body(0, b"user.x"))
        assert error == 0 and abi.GETXATTR_OUT.unpack(payload)[0] == 5
        assert (await kernel.call(abi.Op.GETXATTR, 3, 2, body(2, b"user.x")))[0] == -errno.ERANGE
        assert (await kernel.call(abi.Op.GETXATTR, 4, 2, body(64, b"user.x"))) == (0, b"value")
        assert (await kernel.call(abi.Op.GETXATTR, 5, 2, body(64, b"user.y")))[0] == -errno.ENODATA

    trio.run(with_session, ToyFS(), check)


def test_forget_takes_no_reply_and_destroy_ends_the_session():
    forgotten = []

    class Forgetful(ToyFS):
        def forget(self, items):
            forgotten.extend(items)

    async def check(kernel, session):
        await kernel.send(request(abi.Op.FORGET, 0, 2, abi.FORGET_IN.pack(3)))
        batch = abi.BATCH_FORGET_IN.pack(2, 0) + abi.FORGET_ONE.pack(4, 1) + abi.FORGET_ONE.pack(5, 2)
        await kernel.send(request(abi.Op.BATCH_FORGET, 0, 0, batch))
        assert (await kernel.call(abi.Op.DESTROY, 9))[0] == 0
        assert forgotten == [(2, 3), (4, 1), (5, 2)]

    trio.run(with_session, Forgetful(), check)


def test_a_crashing_handler_answers_eio():
    class Broken(ToyFS):
        def getattr(self, ino, ctx):
            raise RuntimeError("bug")

    async def check(kernel, session):
        assert (await kernel.call(abi.Op.GETATTR, 2, 2, abi.GETATTR_IN.pack(0, 0, 0)))[0] == -errno.EIO
        assert session.errors["handler_crash"] == 1
        assert (await kernel.call(abi.Op.LOOKUP, 3, body=b"file\0"))[0] == 0

    trio.run(with_session, Broken(), check)


def test_work_between_requests_never_holds_up_reads_or_requests():
    """An `idle` that always has more to do (listing ahead of a walk over a
    huge tree) still lets READ tasks run and requests be answered."""
    class Busy(ToyFS):
        calls = 0

        def idle(self):
            self.calls += 1
            return True

    fs = Busy()

    async def check(kernel, session):
        for unique in range(2, 12):
            error, data = await kernel.call(abi.Op.READ, unique, 2,
                                            abi.READ_IN.pack(2, 0, 4, 0, 0, 0, 0))
            assert (error, data) == (0, b"0123")
        assert fs.calls > 0

    trio.run(with_session, fs, check)


def test_work_between_requests_that_fails_is_dropped_once():
    class Broken(ToyFS):
        calls = 0

        def idle(self):
            self.calls += 1
            raise RuntimeError("bug")

    fs = Broken()

    async def check(kernel, session):
        for unique in range(2, 6):
            assert (await kernel.call(abi.Op.GETATTR, unique, 2,
                                      abi.GETATTR_IN.pack(0, 0, 0)))[0] == 0
        assert fs.calls == 1 and session.errors["idle_crash"] == 1

    trio.run(with_session, fs, check)
