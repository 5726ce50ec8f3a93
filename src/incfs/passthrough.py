"""Passthrough for complete files: the kernel reads them like any local file.

FUSE passthrough (kernel 6.9+, protocol 7.40) has no offset mapping: the
backing file must hold exactly the file's bytes. So once every block of a
file is present, a worker thread *expands* it: reads it through
`Image.read_range` (every block checked against the signed Merkle tree on
the way), writes it to a plain file in a private directory beside the image
(root-owned, 0400, in a 0700 directory; created under a temporary name,
fsynced, then renamed, so a crash never leaves a short file under the real
name), and where the kernel has fs-verity, enables it and checks that the
kernel's measurement is the signed digest. Plain files left from an earlier
mount are re-hashed against the Merkle root before first use: nothing that
has not been checked this session is ever handed to the kernel.

A file is expanded when the fill that completes it arrives, or when it is
opened complete (not at mount: a complete local image would otherwise be
copied whole, wanted or not); opens before that are cached-mode, later ones
passthrough.

Opens then get FOPEN_PASSTHROUGH with a backing id, registered on the first
such open. The kernel refuses passthrough for an inode that still has
cached-mode opens (and the reverse), so an inode switches at the first open
after its last cached open is released; files still loading stay on the
daemon path. Needs CAP_SYS_ADMIN (the kernel's rule for backing files).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

import trio

from . import BLOCK_SIZE, kmount, openfiles
from .errors import IncfsError
from .integrity import merkle
from .namespace import Inode
from .space import plainfiles
from .space.release import drop_plain, release_to_plain

log = logging.getLogger("incfs.passthrough")

CAP_SYS_ADMIN = 21
COPY_CHUNK = 1 << 20
EXPAND_QUEUE = 1 << 20  # inode numbers waiting to be expanded (never blocks fills)
FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686


def possible() -> bool:
    """Whether this process may register backing files (CAP_SYS_ADMIN)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


class _FileState:
    """What passthrough knows of one inode (a state object: equal only to
    itself; a plain class, which costs nothing to create at import: docs/startup.md)."""

    def __init__(self, *, plain_ready: bool = False, backing_id: int | None = None,
                 pinned: str | None = None) -> None:
        self.cached_opens = 0  # opens answered in cached (daemon) mode, not yet released
        self.passthrough_opens = 0
        self.plain_ready = plain_ready  # expanded or re-verified this session
        self.backing_id = backing_id
        # After a takeover the open counts are unknown: an inode some process
        # has open stays in the mode it was in ("cached" or "passthrough") for
        # the rest of this daemon's life.
        self.pinned = pinned


class Passthrough:
    """Which files are served by the kernel, and the worker that expands them."""

    def __init__(self, session, service, directory: Path):
        self.session = session
        self.service = service
        self.image = service.image
        self.directory = directory
        self.files: dict[int, _FileState] = {}
        self.counters = {"files_expanded": 0, "files_reverified": 0, "bytes_expanded": 0,
                         "expand_errors": 0, "passthrough_opens": 0, "verity": 0,
                         "bytes_released": 0, "plain_copies_dropped": 0}
        self.verity = True  # until the file system says it has none
        self._send, self._receive = trio.open_memory_channel(EXPAND_QUEUE)
        self._queued: set[int] = set()
        self.markers: Path = directory  # set by run(): the runtime dir's passthrough/

    @classmethod
    async def run(cls, session, service, markers: Path, resumed: bool, mountpoint: str, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        self = cls(session, service, plain_directory(service.image.path))
        self.markers = markers
        self._prepare_directory(resumed)  # a few local mkdirs: a thread's start costs more
        if resumed:
            await trio.to_thread.run_sync(self._take_over, mountpoint)
        service.passthrough = self
        task_status.started(self)
        async for ino in self._receive:
            node = self.image.ns.inodes.get(ino)
            if node is not None:
                await self._expand_one(node)

    # --- opens (the FUSE thread) ------------------------------------------------

    def open(self, node: Inode) -> int | None:
        """The backing id to open `node` in passthrough, or None: cached mode."""
        state = self.files.setdefault(node.ino, _FileState())
        if state.pinned == "passthrough":
            state.passthrough_opens += 1
            return state.backing_id
        if state.pinned is None and state.plain_ready and state.cached_opens == 0:
            if state.backing_id is None:
                state.backing_id = self._register(node)
            if state.backing_id is not None:
                state.passthrough_opens += 1
                self.counters["passthrough_opens"] += 1
                return state.backing_id
        state.cached_opens += 1
        if not state.plain_ready and node.complete:
            self.file_completed(node)  # expanded now; a later open goes passthrough
        return None

    def release(self, node: Inode) -> None:
        state = self.files.get(node.ino)
        if state is None:
            return
        if state.passthrough_opens and state.backing_id is not None and state.cached_opens == 0:
            state.passthrough_opens -= 1
        elif state.cached_opens:
            state.cached_opens -= 1
        elif state.passthrough_opens:
            state.passthrough_opens -= 1

    def mode_of(self, node: Inode) -> str:
        state = self.files.get(node.ino)
        return "passthrough" if state is not None and state.plain_ready else "daemon"

    def _register(self, node: Inode) -> int | None:
        try:
            fd = os.open(self._plain(node), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("plain file of inode %d: %s", node.ino, e)
            self.files[node.ino].plain_ready = False
            return None
        try:
            backing_id = self.session.backing_open(fd)
        except OSError as e:
            log.warning("FUSE_DEV_IOC_BACKING_OPEN for inode %d: %s", node.ino, e)
            return None
        finally:
            os.close(fd)
        # before the kernel hears of it: a daemon taking over must know that
        # this inode's opens are passthrough ones, and with which backing id
        (self.markers / str(node.ino)).write_text(f"{backing_id}\n")
        return backing_id

    def _take_over(self, mountpoint: str) -> None:
        """Learn what the daemon before us did: its markers name the inodes it
        opened in passthrough mode (their backing ids are still registered:
        they belong to the connection, not to a process); any other inode a
        process has open was opened in cached mode."""
        for marker in self.markers.iterdir():
            try:
                ino, backing_id = int(marker.name), int(marker.read_text())
            except (OSError, ValueError):
                continue
            self.files[ino] = _FileState(plain_ready=True, backing_id=backing_id,
                                         pinned="passthrough")
        entry = kmount.mount_at(mountpoint)
        if entry is None:
            return
        for ino in openfiles.open_inodes(entry.major, entry.minor):
            self.files.setdefault(ino, _FileState(pinned="cached"))

    # --- expanding (a worker thread) ------------------------------------------------

    def file_completed(self, node: Inode) -> None:
        """Queue a complete file for expansion (on the trio thread)."""
        if node.ino in self._queued or not node.is_reg:
            return
        self._queued.add(node.ino)
        try:
            self._send.send_nowait(node.ino)
        except trio.WouldBlock:
            self._queued.discard(node.ino)

    async def _expand_one(self, node: Inode) -> None:
        try:
            ready = await trio.to_thread.run_sync(self._make_plain, node)
        except (IncfsError, OSError) as e:
            self.counters["expand_errors"] += 1
            log.warning("cannot expand inode %d for passthrough: %s", node.ino, e)
            return
        self.files.setdefault(node.ino, _FileState()).plain_ready = ready

    def _prepare_directory(self, resumed: bool) -> None:
        for directory in (self.directory, self.markers):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        if not resumed:  # markers of an earlier connection mean nothing to this one
            for marker in self.markers.iterdir():
                marker.unlink(missing_ok=True)

    def _plain(self, node: Inode) -> Path:
        return self.directory / plainfiles.plain_name(node.file_id, node.ino)

    def _make_plain(self, node: Inode) -> bool:
        path = self._plain(node)
        if path.exists() and self._plain_matches(node, path):
            self.counters["files_reverified"] += 1
            self._release(node)
            return True
        if node.ino in self.image.plain_inos:
            # its blocks lived in that copy, which is bad: they are absent
            # now (fetched again; a later completion expands it anew)
            with self.service.image_lock:
                drop_plain(self.image, node)
            self.counters["plain_copies_dropped"] += 1
            self._queued.discard(node.ino)
            return False
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o400)
        try:
            for offset in range(0, node.size, COPY_CHUNK):
                data = self.image.read_range(node, offset, COPY_CHUNK)  # verified
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        _fsync_dir(self.directory)
        self._enable_verity(node, path)
        self.counters["files_expanded"] += 1
        self.counters["bytes_expanded"] += node.size
        self._release(node)
        return True

    def _release(self, node: Inode) -> None:
        """The plain copy is durable and verified: a cache gives up its own
        copy of the bytes (no second copy at rest; incfs.space.release)."""
        with self.service.image_lock:
            self.counters["bytes_released"] += release_to_plain(self.image, node)

    def _plain_matches(self, node: Inode, path: Path) -> bool:
        """A plain file from an earlier mount: its size and Merkle root must
        be the image's (files without a tree are expanded again)."""
        st = path.stat()
        if st.st_size != node.size or not node.has_tree or st.st_uid != os.geteuid():
            return False
        if self.verity and self._measure(path) == self.image.file_digest(node):
            return True
        hashes = []
        with open(path, "rb") as f:
            while block := f.read(BLOCK_SIZE):
                hashes.append(merkle.hash_block(block))
        root, _ = merkle.build_tree(hashes, node.size)
        return root == node.root_hash

    def _enable_verity(self, node: Inode, path: Path) -> None:
        """fs-verity on the plain file, where the file system has it: then the
        kernel itself checks every page against the signed root. Untested on
        this machine (its kernel lacks CONFIG_FS_VERITY)."""
        if not self.verity or not node.has_tree:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            arg = struct.pack("=IIIIQIIQ11Q", 1, 1, BLOCK_SIZE, 0, 0, 0, 0, 0, *([0] * 11))
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                self.verity = False
                log.info("no fs-verity on %s: plain files are checked by hashing", path.parent)
                return
            if e.errno != errno.EEXIST:
                raise
        finally:
            os.close(fd)
        if self._measure(path) != self.image.file_digest(node):
            path.unlink(missing_ok=True)
            raise IncfsError(f"fs-verity digest of {path.name} is not the signed one")
        self.counters["verity"] += 1

    @staticmethod
    def _measure(path: Path) -> bytes | None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = bytearray(struct.pack("=HH", 0, 64) + bytes(64))
            fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
        except OSError:
            return None
        finally:
            os.close(fd)
        algorithm, size = struct.unpack_from("=HH", buf)
        return bytes(buf[4:4 + size]) if algorithm == 1 else None

    def status(self) -> dict:
        ready = sum(1 for s in self.files.values() if s.plain_ready)
        cached = sum(s.cached_opens for s in self.files.values())
        return {"files_passthrough": ready, "cached_opens": cached, "fs_verity": self.verity,
                **self.counters}


plain_directory = plainfiles.plain_directory


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
