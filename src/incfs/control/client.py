"""The Python client of the control protocol: what a data loader uses.

    from incfs import ROOT_INO
    from incfs.control import Client

    c = Client.connect("/mnt/app")
    ino = c.create_file(ROOT_INO, "game.bin", size=10 << 20)
    for pr in c.pending_reads(timeout=5):
        c.fill_blocks(pr.ino, [(pr.block, fetch(pr.ino, pr.block))])

Blocking and thread-safe (one request at a time per client); open one client
per process or thread for parallel loaders. Errors raise OSError with the
errno the server chose (EEXIST, EINVAL, EMLINK, ENOTEMPTY, ENOENT, ...).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

from . import wire
from .wire import Op


Xattrs = Mapping[str | bytes, bytes]  # extended attribute name -> value


class PendingRead(NamedTuple):
    serial: int
    ino: int
    block: int
    tree: int  # 0 data, 1 hash-tree block
    time_ns: int


class Block(NamedTuple):
    """A block to fill: `data` as stored (raw, or compressed as named)."""

    index: int
    data: bytes
    compression: str = "none"  # none | lz4 | zstd
    tree: str = "data"  # data | hash


class FillError(OSError):
    """Some blocks of a fill were refused; `result` says which and why."""

    def __init__(self, code: int, message: str, result: dict):
        super().__init__(code, message)
        self.result = result


class Client:
    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()
        self._next_id = 1
        self.server = self._call(Op.HELLO, {})
        self.minor = self.server.get("minor", 0)  # 0: a daemon of protocol 1.0

    @classmethod
    def connect(cls, mountpoint: str | os.PathLike, timeout: float | None = None) -> "Client":
        """Connect to the mount at `mountpoint` (its socket path is published
        in `.incfs/control` inside the mount)."""
        return cls.connect_socket(socket_path_of(mountpoint), timeout)

    @classmethod
    def connect_socket(cls, path: str, timeout: float | None = None) -> "Client":
        """Connect to a control socket by its path."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport -------------------------------------------------------------

    def _call(self, op: Op, fields: dict, tail: bytes = b"") -> dict:
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            self._sock.sendall(wire.encode(op, request_id, fields, tail))
            header = self._recv_exact(wire.HEADER.size)
            length, _v, _op, _rid = wire.parse_header(header)
            answer, _tail = wire.decode_payload(self._recv_exact(length))
        if not answer.get("ok"):
            code = answer.get("errno", errno.EIO)
            raise OSError(code, f"{os.strerror(code)}: {answer.get('error', '')}")
        return answer

    def _recv_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self._sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise ConnectionError("incfs control socket closed")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    # --- namespace -------------------------------------------------------------

    def create_file(self, parent: int, name: str | bytes, size: int, mode: int = 0o444,
                    file_id: bytes | None = None, metadata: bytes = b"",
                    root_hash: bytes | None = None, *, uid: int = 0, gid: int = 0,
                    xattrs: Xattrs | None = None) -> int:
        """Create a file of `size` bytes with no data yet; returns its inode.

        With `root_hash` (the fs-verity Merkle root of the content) every
        block is verified against the tree before it is stored. `uid`,
        `gid` and `xattrs` (name -> value) need a 1.1 daemon."""
        fields = {"parent": parent, **_name(name), "size": size, "mode": mode,
                  "metadata": metadata.hex(), **self._owners(uid, gid, xattrs)}
        if file_id is not None:
            fields["file_id"] = file_id.hex()
        if root_hash is not None:
            fields["root_hash"] = root_hash.hex()
        return self._call(Op.CREATE_FILE, fields)["ino"]

    def mkdir(self, parent: int, name: str | bytes, mode: int = 0o555, *, uid: int = 0,
              gid: int = 0, xattrs: Xattrs | None = None) -> int:
        return self._call(Op.MKDIR, {"parent": parent, **_name(name), "mode": mode,
                                     **self._owners(uid, gid, xattrs)})["ino"]

    def symlink(self, parent: int, name: str | bytes, target: str | bytes, *, uid: int = 0,
                gid: int = 0, xattrs: Xattrs | None = None) -> int:
        return self._call(Op.SYMLINK, {"parent": parent, **_name(name),
                                       "target": os.fsencode(target).hex(),
                                       **self._owners(uid, gid, xattrs)})["ino"]

    def mknod(self, parent: int, name: str | bytes, kind: str, mode: int = 0o444,
              rdev: int = 0, *, uid: int = 0, gid: int = 0, xattrs: Xattrs | None = None) -> int:
        """A device node (`kind` "chr" or "blk", `rdev` as os.makedev gives
        it), a fifo ("fifo") or a socket ("sock"). Needs a 1.1 daemon."""
        self._need_minor(1, "mknod")
        return self._call(Op.MKNOD, {"parent": parent, **_name(name), "type": kind,
                                     "mode": mode, "rdev": rdev,
                                     **self._owners(uid, gid, xattrs)})["ino"]

    def _owners(self, uid: int, gid: int, xattrs: Xattrs | None) -> dict:
        """The 1.1 fields, sent only when they say something: a 1.0 daemon
        would ignore them, so asking one for them is an error here."""
        if not (uid or gid or xattrs):
            return {}
        self._need_minor(1, "owners and extended attributes")
        fields: dict = {"uid": uid, "gid": gid}
        if xattrs:
            fields["xattrs"] = {os.fsdecode(n): bytes(v).hex() for n, v in xattrs.items()}
        return fields

    def _need_minor(self, minor: int, what: str) -> None:
        if self.minor < minor:
            raise OSError(errno.EOPNOTSUPP, f"{what} need protocol 1.{minor}; the daemon "
                                            f"speaks 1.{self.minor}")

    def link(self, ino: int, parent: int, name: str | bytes) -> None:
        self._call(Op.LINK, {"ino": ino, "parent": parent, **_name(name)})

    def unlink(self, parent: int, name: str | bytes) -> None:
        self._call(Op.UNLINK, {"parent": parent, **_name(name)})

    def lookup(self, parent: int, name: str | bytes) -> int:
        return self._call(Op.LOOKUP, {"parent": parent, **_name(name)})["ino"]

    # --- data ------------------------------------------------------------------

    def fill_blocks(self, ino: int, blocks: Iterable[Block | tuple],
                    leaves: Iterable[int] = ()) -> int:
        """Store blocks of one file; returns how many were newly stored.

        Each block is a `Block` or a tuple (index, data[, compression[, tree]]).
        A block already present is a silent no-op. If any block is refused
        (bad size, past EOF, fails verification) the others are still stored
        and FillError (an OSError) says which were refused. `leaves`: leaf
        hash blocks (storage indexes) to build from the data blocks sent
        under them, all of which must be in `blocks`, instead of sending them."""
        specs, parts, offset = [], [], 0
        for b in blocks:
            b = b if isinstance(b, Block) else Block(*b)
            specs.append({"index": b.index, "compression": b.compression,
                          "tree": 1 if b.tree in ("hash", 1) else 0,
                          "offset": offset, "length": len(b.data)})
            parts.append(bytes(b.data))
            offset += len(b.data)
        request = {"ino": ino, "blocks": specs}
        if leaves:
            request["leaves"] = list(leaves)
        answer = self._call(Op.FILL_BLOCKS, request, b"".join(parts))
        if answer["errors"]:
            first = answer["errors"][0]
            raise FillError(first["errno"], f"block {first['index']}: {first['error']}", answer)
        return answer["stored"]

    def pending_reads(self, timeout: float = 0, after_serial: int = 0,
                      limit: int = 1024) -> list[PendingRead]:
        """Reads waiting for blocks, newer than `after_serial`; blocks up to
        `timeout` seconds until there is at least one."""
        answer = self._call(Op.PENDING_READS, {"timeout": timeout, "after_serial": after_serial,
                                               "limit": limit})
        return [PendingRead(r["serial"], r["ino"], r["block"], r["tree"], r["time_ns"])
                for r in answer["reads"]]

    def filled_ranges(self, ino: int) -> list[tuple[int, int]]:
        """Present data blocks of a file as [start, end) block ranges."""
        return [tuple(r) for r in self._call(Op.FILLED_RANGES, {"ino": ino})["data"]]

    def presence(self, ino: int | None = None, after_ino: int = 0,
                 limit: int = 1024) -> tuple[list[dict], bool]:
        """Present blocks of one file (`ino`), or of a page of regular files
        with inode numbers above `after_ino`: (files, more). Each file is a
        dict: ino, size, blocks, present, data ([start, end) pairs) and, with
        a hash tree, hash_blocks and hash."""
        fields = {"ino": ino} if ino is not None else {"after_ino": after_ino, "limit": limit}
        answer = self._call(Op.PRESENCE, fields)
        return answer["files"], answer["more"]

    def presence_all(self) -> list[dict]:
        """`presence` of every regular file, in inode order (all pages)."""
        files: list[dict] = []
        more = True
        while more:
            page, more = self.presence(after_ino=files[-1]["ino"] if files else 0)
            files += page
            more = more and bool(page)
        return files

    def read_log(self, after_serial: int = 0) -> list[tuple[int, int, int, int]]:
        """Recent block reads: (serial, ino, block, time_ns), oldest first."""
        return [tuple(e) for e in self._call(Op.READ_LOG, {"after_serial": after_serial})["entries"]]

    def last_read_error(self) -> dict | None:
        """The last read that failed: ino, file_id (hex), block, errno,
        error (its name), why, uid, time_ns; None if none has."""
        self._need_minor(1, "the last read error")
        return self._call(Op.LAST_READ_ERROR, {})["error"]

    def set_read_timeouts(self, timeouts: dict[int, float | None]) -> dict[int, float | None]:
        """Replace the per-uid read timeouts: uid -> seconds (None: forever).
        A uid not listed waits the mount's --read-timeout. Returns the table."""
        self._need_minor(1, "per-uid read timeouts")
        entries = [{"uid": u, "timeout": t} for u, t in timeouts.items()]
        return _timeouts(self._call(Op.SET_READ_TIMEOUTS, {"timeouts": entries}))

    def read_timeouts(self) -> dict[int, float | None]:
        """The per-uid read timeouts (the mount's default is in status())."""
        self._need_minor(1, "per-uid read timeouts")
        return _timeouts(self._call(Op.READ_TIMEOUTS, {}))

    def status(self) -> dict:
        answer = self._call(Op.STATUS, {})
        answer.pop("ok", None)
        return answer


def _timeouts(answer: dict) -> dict[int, float | None]:
    return {e["uid"]: e["timeout"] for e in answer["timeouts"]}


def _name(name: str | bytes) -> dict:
    raw = os.fsencode(name)
    try:
        return {"name": raw.decode()}
    except UnicodeDecodeError:
        return {"name": "", "name_hex": raw.hex()}


def socket_path_of(mountpoint: str | os.PathLike) -> str:
    published = Path(mountpoint) / ".incfs" / "control"
    try:
        return published.read_text().strip()
    except OSError as e:
        raise OSError(e.errno or errno.ENOENT,
                      f"{mountpoint} is not an incfs mount (no .incfs/control)") from None
