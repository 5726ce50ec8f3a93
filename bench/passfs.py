"""The "throwaway pyfuse3 server" of DESIGN.md, as a reference in the same run.

A minimal read-only pyfuse3 + trio passthrough of a directory: no
verification, no decompression, no block maps; os.pread on the real file.
Same cache policy as incfs (long entry/attr timeouts, keep_cache, 1 MiB
readahead), so the gap between it and incfs is the cost of incfs's own work.

    python bench/passfs.py SOURCE_DIR MOUNTPOINT     # foreground; SIGTERM/umount ends it
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

TIMEOUT = 3600.0


class PassFS(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.inos: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.fds: dict[int, int] = {}
        self.dirs: dict[int, list[tuple[bytes, str]]] = {}
        self.next_fh = 1

    def _ino(self, path: str) -> int:
        ino = self.inos.get(path)
        if ino is None:
            ino = self.inos[path] = self.next_ino
            self.paths[ino] = path
            self.next_ino += 1
        return ino

    def _attr(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._ino(path)
        a.st_mode, a.st_nlink, a.st_size = st.st_mode, st.st_nlink, st.st_size
        a.st_uid, a.st_gid = st.st_uid, st.st_gid
        a.st_blksize, a.st_blocks = 4096, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(self.paths[inode])

    async def lookup(self, parent_inode, name, ctx=None):
        return self._attr(os.path.join(self.paths[parent_inode], os.fsdecode(name)))

    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self.paths[inode]))

    async def opendir(self, inode, ctx):
        path = self.paths[inode]
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = [(os.fsencode(n), os.path.join(path, n)) for n in sorted(os.listdir(path))]
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.dirs[fh]
        for i in range(start_id, len(entries)):
            name, path = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(path), i + 1):
                return

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = os.open(self.paths[inode], os.O_RDONLY)
        fh = self.next_fh
        self.next_fh += 1
        self.fds[fh] = fd
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fds[fh], size, off)

    async def release(self, fh):
        fd = self.fds.pop(fh, None)
        if fd is not None:
            os.close(fd)

    async def forget(self, inode_list):
        pass


def _tune_readahead(mountpoint: str) -> None:
    try:
        dev = os.stat(mountpoint).st_dev
        Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text("1024")
    except OSError:
        pass


async def _main(source: str, mountpoint: str) -> None:
    ops = PassFS(source)
    options = set(pyfuse3.default_options) | {"fsname=passfs", "ro", "allow_other"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _tune_readahead, mountpoint)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=False)


def main(argv: list[str]) -> int:
    source, mountpoint = os.path.realpath(argv[0]), argv[1]
    if not stat.S_ISDIR(os.stat(source).st_mode):
        return 2
    trio.run(_main, source, mountpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
