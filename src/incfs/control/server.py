"""The control server: a Unix socket that only the mount's owner (or root) may
use. Each connection is served by its own trio task; a malformed frame gets an
error answer and closes only that connection, never the mount."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from pathlib import Path

import trio

from .. import ROOT_INO
from ..codec import COMPRESSIONS
from ..errors import IncfsError
from ..format.records import TreeKind
from ..image import FillBlock
from ..service import Service
from ..namespace import MAX_ID
from . import wire
from .posix import node_type, owner_fields, rdev_of
from .wire import Op, ProtocolError

log = logging.getLogger("incfs.control")
MAX_CONNECTIONS = 256
# Frames over SMALL_FRAME share a budget of bytes held at once across all
# connections (a frame waits for room): without it, 256 clients each sending
# most of a 64 MiB frame and then stalling held 16 GiB of daemon memory.
SMALL_FRAME = 1 << 20
MAX_BUFFERED = 128 << 20
MAX_PENDING_WAIT = 3600.0
# PRESENCE pages: at most this many files, and stop adding files after this
# many ranges, so an answer stays far below MAX_FRAME
MAX_PRESENCE_FILES = 65536
MAX_PRESENCE_RANGES = 1 << 20
MAX_UID_TIMEOUTS = 4096  # entries of SET_READ_TIMEOUTS (Android allows far fewer)
MAX_TIMEOUT = 86400.0 * 365  # a bound beyond a year is "forever": send null


class ControlServer:
    def __init__(self, service: Service, path: Path, owner_uid: int):
        self.service = service
        self.path = path
        self.owner_uid = owner_uid
        self.connections = 0
        self.buffered = 0  # bytes of large frames being received or served
        self._room = trio.Event()
        self.handlers = {
            Op.HELLO: self._hello, Op.CREATE_FILE: self._create_file, Op.MKDIR: self._mkdir,
            Op.SYMLINK: self._symlink, Op.LINK: self._link, Op.UNLINK: self._unlink,
            Op.FILL_BLOCKS: self._fill, Op.PENDING_READS: self._pending,
            Op.FILLED_RANGES: self._filled_ranges, Op.READ_LOG: self._read_log,
            Op.STATUS: self._status, Op.LOOKUP: self._lookup,
            Op.PRESENCE: self._presence, Op.MKNOD: self._mknod,
            Op.LAST_READ_ERROR: self._last_read_error,
            Op.SET_READ_TIMEOUTS: self._set_read_timeouts, Op.READ_TIMEOUTS: self._read_timeouts,
        }

    def listen(self) -> trio.SocketListener:
        """Bind the socket (mode 0600 inside a 0700 directory)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise IncfsError(f"{self.path} exists and is not a socket")
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            # trio's bind is async; the path is local so a plain bind is fine
            sock._sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(128)
        return trio.SocketListener(sock)

    async def serve(self, listener: trio.SocketListener, task_status=trio.TASK_STATUS_IGNORED):
        async with listener:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._connection, stream)

    # --- one connection --------------------------------------------------------

    def _peer_allowed(self, stream: trio.SocketStream) -> bool:
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == 0 or uid == self.owner_uid

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            if not self._peer_allowed(stream):
                await _send_quietly(stream, wire.encode(Op.RESPONSE, 0, _error(
                    errno.EACCES, "only the mount's owner may use the control socket")))
                return
            if self.connections >= MAX_CONNECTIONS:
                await _send_quietly(stream, wire.encode(Op.RESPONSE, 0, _error(
                    errno.EMFILE, "too many control connections")))
                return
            self.connections += 1
            try:
                await self._serve_frames(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.connections -= 1

    async def _serve_frames(self, stream: trio.SocketStream) -> None:
        reader = _FrameReader(stream, self)
        try:
            await self._serve_frames_of(stream, reader)
        finally:
            reader.release()

    async def reserve(self, n: int) -> None:
        while self.buffered and self.buffered + n > MAX_BUFFERED:
            await self._room.wait()
        self.buffered += n

    def release(self, n: int) -> None:
        self.buffered -= n
        self._room.set()
        self._room = trio.Event()

    async def _serve_frames_of(self, stream: trio.SocketStream, reader: "_FrameReader") -> None:
        while True:
            try:
                frame = await reader.next()
            except ProtocolError as e:
                await _send_quietly(stream, wire.encode(Op.RESPONSE, 0, _error(errno.EPROTO, str(e))))
                return
            if frame is None:
                return
            op, request_id, payload = frame
            answer, tail = await self._dispatch(op, payload)
            try:
                frame_out = wire.encode(Op.RESPONSE, request_id, answer, tail)
            except ProtocolError as e:  # the answer would exceed MAX_FRAME
                answer = _error(errno.EMSGSIZE, str(e))
                frame_out = wire.encode(Op.RESPONSE, request_id, answer)
            await stream.send_all(frame_out)
            if answer.get("errno") == errno.EPROTO:
                return

    async def _dispatch(self, op: int, payload: bytes) -> tuple[dict, bytes]:
        handler = self.handlers.get(op)
        if handler is None:
            return _error(errno.EOPNOTSUPP, f"unknown operation {op}"), b""
        try:
            fields, tail = wire.decode_payload(payload)
            result = await handler(fields, tail)
        except ProtocolError as e:
            return _error(errno.EPROTO, str(e)), b""
        except OSError as e:
            return _error(e.errno or errno.EIO, e.strerror or str(e)), b""
        except IncfsError as e:
            return _error(e.errno, str(e)), b""
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
                IndexError, struct.error) as e:
            return _error(errno.EINVAL, f"bad request: {e!r}"), b""
        except Exception as e:  # noqa: BLE001 - one bad request must never end the mount
            log.exception("control request %s failed", op)
            return _error(errno.EIO, f"internal error: {e!r}"), b""
        if isinstance(result, tuple):
            return {"ok": True, **result[0]}, result[1]
        return {"ok": True, **result}, b""

    # --- operations ------------------------------------------------------------

    async def _hello(self, f, tail):
        return {"version": wire.VERSION, "minor": wire.MINOR, "root": ROOT_INO,
                "pid": os.getpid()}

    async def _create_file(self, f, tail):
        root_hash = bytes.fromhex(f["root_hash"]) if f.get("root_hash") else None
        file_id = bytes.fromhex(f["file_id"]) if f.get("file_id") else None
        mode = stat.S_IFREG | (_int(f.get("mode", 0o444)) & 0o7777)
        ino = await self.service.create(
            _int(f["parent"]), _name(f), mode, size=_int(f["size"]), file_id=file_id,
            metadata=bytes.fromhex(f.get("metadata", "")), root_hash=root_hash,
            **owner_fields(f))
        return {"ino": ino}

    async def _mkdir(self, f, tail):
        mode = stat.S_IFDIR | (_int(f.get("mode", 0o555)) & 0o7777)
        return {"ino": await self.service.create(_int(f["parent"]), _name(f), mode,
                                                 **owner_fields(f))}

    async def _symlink(self, f, tail):
        target = bytes.fromhex(f["target"])
        mode = stat.S_IFLNK | 0o777
        return {"ino": await self.service.create(_int(f["parent"]), _name(f), mode,
                                                 size=len(target), target=target,
                                                 **owner_fields(f))}

    async def _mknod(self, f, tail):
        """A device node, fifo or socket (1.1): `type`, `mode` (permission
        bits), `rdev` or `major`/`minor` for devices, owners and xattrs."""
        kind = node_type(f)
        rdev = rdev_of(f)
        if rdev and kind not in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EINVAL, "only devices have a device number")
        mode = kind | (_int(f.get("mode", 0o444)) & 0o7777)
        return {"ino": await self.service.create(_int(f["parent"]), _name(f), mode, rdev=rdev,
                                                 **owner_fields(f))}

    async def _last_read_error(self, f, tail):
        return {"error": self.service.last_read_error}

    async def _set_read_timeouts(self, f, tail):
        """Replace the per-uid read timeouts (as incfs v2's
        INCFS_IOC_SET_READ_TIMEOUTS does): `timeouts` is a list of
        {uid, timeout} with timeout in seconds, or null for forever. Checked
        whole before anything changes."""
        entries = f["timeouts"]
        if not isinstance(entries, list):
            raise ProtocolError("timeouts must be a list of {uid, timeout}")
        if len(entries) > MAX_UID_TIMEOUTS:
            raise OSError(errno.E2BIG, f"at most {MAX_UID_TIMEOUTS} uids")
        table = dict(_uid_timeout(e) for e in entries)
        self.service.waits.uid_timeouts = table
        return await self._read_timeouts(f, tail)

    async def _read_timeouts(self, f, tail):
        waits = self.service.waits
        return {"default": waits.read_timeout,
                "timeouts": [{"uid": u, "timeout": t} for u, t in sorted(waits.uid_timeouts.items())]}

    async def _link(self, f, tail):
        await self.service.link(_int(f["ino"]), _int(f["parent"]), _name(f))
        return {}

    async def _unlink(self, f, tail):
        await self.service.unlink(_int(f["parent"]), _name(f))
        return {}

    async def _lookup(self, f, tail):
        node = self.service.image.ns.lookup(_int(f["parent"]), _name(f))
        return {"ino": node.ino, "mode": node.mode, "size": node.size}

    async def _fill(self, f, tail):
        blocks = []
        for b in f["blocks"]:
            kind = COMPRESSIONS.get(b.get("compression", "none"))
            if kind is None:
                raise ProtocolError(f"unknown compression {b.get('compression')!r}")
            tree = TreeKind.HASH if b.get("tree") in (1, "hash") else TreeKind.DATA
            data = wire.tail_slice(tail, b["offset"], b["length"])
            blocks.append(FillBlock(_int(b["index"]), data, kind, tree))
        leaves = f.get("leaves", [])
        if not isinstance(leaves, list) or len(leaves) > len(blocks):
            raise ProtocolError("leaves: a list of hash block indexes, at most one per block")
        result = await self.service.fill(_int(f["ino"]), blocks, leaves={_int(s) for s in leaves})
        return {"stored": result.stored, "already": result.already,
                "errors": [{"index": i, "errno": e, "error": why} for i, e, why in result.errors],
                "leaves_built": result.leaves_built, "leaves_refused": result.leaves_refused}

    async def _pending(self, f, tail):
        timeout = min(float(f.get("timeout", 0)), MAX_PENDING_WAIT)
        found = await self.service.waits.next_pending(
            timeout, _int(f.get("after_serial", 0)), min(_int(f.get("limit", 1024)), 65536))
        return {"reads": [pr.as_dict() for pr in found]}

    async def _filled_ranges(self, f, tail):
        node = self.service.image.ns.get(_int(f["ino"]))
        if node.data is None:
            raise OSError(errno.EINVAL, "not a regular file")
        out = {"data": node.data.ranges(), "blocks": node.data.count}
        if node.hashes is not None:
            out["hash"] = node.hashes.ranges()
            out["hash_blocks"] = node.hashes.count
        return out

    async def _presence(self, f, tail):
        """Present blocks of one file (`ino`) or a page of every regular file
        in inode order (`after_ino`, `limit`): the presence picture's source."""
        ns = self.service.image.ns
        if "ino" in f:
            nodes = [ns.get(_int(f["ino"]))]
            if nodes[0].data is None:
                raise OSError(errno.EINVAL, "not a regular file")
            later = False
        else:
            after = _int(f.get("after_ino", 0))
            limit = max(1, min(_int(f.get("limit", 1024)), MAX_PRESENCE_FILES))
            inos = ns.files_after(after, limit + 1)
            nodes = [ns.inodes[ino] for ino in inos[:limit]]
            later = len(inos) > limit  # files beyond this page
        # a big map takes a while to walk: not on the trio thread
        files = await trio.to_thread.run_sync(self._presence_of, nodes)
        return {"files": files, "more": later or len(files) < len(nodes)}

    def _presence_of(self, nodes) -> list[dict]:
        out, ranges = [], 0
        for node in nodes:
            entry = {"ino": node.ino, "size": node.size, "blocks": node.data.count,
                     "present": node.data.present, "data": self._ranges(node.data)}
            if node.hashes is not None:
                entry.update(hash_blocks=node.hashes.count, hash=self._ranges(node.hashes))
            out.append(entry)
            ranges += len(entry["data"]) + len(entry.get("hash", ()))
            if ranges > MAX_PRESENCE_RANGES:
                break  # the rest in the next page
        return out

    def _ranges(self, blockmap) -> list[tuple[int, int]]:
        """Walk without the image lock, so fills never wait for a long walk;
        a sparse map that a fill changed under the walk (the dict changed
        size) is walked again under the lock."""
        try:
            return blockmap.ranges()
        except RuntimeError:
            with self.service.image_lock:
                return blockmap.ranges()

    async def _read_log(self, f, tail):
        after = _int(f.get("after_serial", 0))
        entries = [e for e in self.service.waits.read_log if e[0] > after]
        return {"entries": entries}

    async def _status(self, f, tail):
        return self.service.status()


class _FrameReader:
    """Reads whole frames from a stream, enforcing the size bound first."""

    def __init__(self, stream: trio.SocketStream, server: "ControlServer | None" = None):
        self.stream = stream
        self.buffer = bytearray()
        self.server = server
        self.reserved = 0

    def release(self) -> None:
        """Give back the budget of the frame before (it has been answered)."""
        if self.reserved and self.server is not None:
            self.server.release(self.reserved)
        self.reserved = 0

    async def _fill(self, n: int) -> bool:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self.buffer)))
            if not chunk:
                if self.buffer:
                    raise ProtocolError("connection closed in the middle of a message")
                return False
            self.buffer += chunk
        return True

    async def next(self) -> tuple[int, int, bytes] | None:
        self.release()
        try:
            if not await self._fill(wire.HEADER.size):
                return None
        except ProtocolError:
            return None
        length, _version, op, request_id = wire.parse_header(bytes(self.buffer[:wire.HEADER.size]))
        if length > SMALL_FRAME and self.server is not None:
            await self.server.reserve(length)
            self.reserved = length
        try:
            if not await self._fill(wire.HEADER.size + length):
                return None
        except ProtocolError:
            return None  # the client went away mid-message: nothing to answer
        payload = bytes(self.buffer[wire.HEADER.size:wire.HEADER.size + length])
        del self.buffer[:wire.HEADER.size + length]
        return op, request_id, payload


def _error(code: int, message: str) -> dict:
    return {"ok": False, "errno": code, "error": message}


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"expected an integer, got {value!r}")
    return value


def _uid_timeout(entry) -> tuple[int, float | None]:
    if not isinstance(entry, dict):
        raise ProtocolError("a read timeout is an object {uid, timeout}")
    uid, timeout = _int(entry["uid"]), entry["timeout"]
    if not 0 <= uid <= MAX_ID:
        raise OSError(errno.EINVAL, f"uid {uid} is out of range")
    if timeout is None:
        return uid, None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ProtocolError(f"timeout must be a number of seconds or null, got {timeout!r}")
    if not 0 < timeout <= MAX_TIMEOUT:  # NaN fails this too
        raise OSError(errno.EINVAL, f"timeout {timeout} is not in (0, {MAX_TIMEOUT:.0f}] seconds")
    return uid, float(timeout)


def _name(f: dict) -> bytes:
    name = f["name"]
    if not isinstance(name, str):
        raise ProtocolError("name must be a string (hex in name_hex for raw bytes)")
    return bytes.fromhex(f["name_hex"]) if f.get("name_hex") else os.fsencode(name)


async def _send_quietly(stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
