"""Helpers for tests on real FUSE mounts: mounting that always cleans up, the
seed selftest's data generators (rnd_buf, shuffle, per-block seeds, the
LZ4 alternation), loaders run in forked children, and validators.

Test modules use it with `from mounting import ...`: pytest puts tests/ on
sys.path (rootdir layout, no __init__.py), and fixtures imported into a test
module's namespace are registered like fixtures defined there.

Everything here mirrors seed 002's incfs_test.c; where this file system
differs (files are created with a name, the loader talks over a socket, the
backing image is kept in a file), the helper says how.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lz4.block
import pytest
import zstandard

from incfs import BLOCK_SIZE, ROOT_INO
from incfs.control import Client
from incfs.mount import MountConfig, mount_background, runtime_dir, umount
from incfs.procs import process_alive, runs_module
from incfs.rundir import drop_daemon_leftovers

try:  # numpy makes the 500 MiB file cheap to generate; the pure port is the reference
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the bench extra
    np = None

MiB = 1 << 20
LONG_TIMEOUT = 60.0  # read timeout for mounts whose reads must wait, not fail
UMOUNT_GRACE = 5.0  # seconds a daemon gets to exit after a clean unmount


# --- mounting ---------------------------------------------------------------------

def is_mounted(path: str | os.PathLike) -> bool:
    """True for a live or dead (ENOTCONN) mount at `path`."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def daemon_pid(mountpoint: str | os.PathLike) -> int | None:
    try:
        return int((runtime_dir(str(mountpoint)) / "pid").read_text())
    except (OSError, ValueError):
        return None


def wait_gone(pid: int | None, timeout: float = 20.0) -> bool:
    """Wait for a process to end (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return not pid or not process_alive(pid)


def force_unmount(mountpoint: str | os.PathLike, pid: int | None = None,
                  grace: float = 10.0) -> None:
    """Last resort: lazy unmount, then make sure the daemon is gone (SIGKILL
    after `grace` seconds)."""
    pid = pid or daemon_pid(mountpoint)
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if pid and not wait_gone(pid, grace) and runs_module(pid, b"incfs.mount"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10.0)
    # a daemon killed here (or before) could not remove its runtime files
    rundir = runtime_dir(str(mountpoint))
    drop_daemon_leftovers(rundir)
    with contextlib.suppress(OSError):
        rundir.rmdir()


class Mount:
    """A running mount: its path, how it was made, and ways to talk to it."""

    def __init__(self, config: MountConfig):
        self.config = config
        self.path = Path(config.mountpoint)
        self.pid: int | None = None

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def cache(self) -> Path | None:
        return Path(self.config.cache) if self.config.cache else None

    def start(self) -> "Mount":
        mount_background(self.config)
        self.pid = daemon_pid(self.path)
        return self

    def client(self, timeout: float | None = 120.0) -> Client:
        return Client.connect(self.path, timeout=timeout)

    def status(self) -> dict:
        return json.loads((self.path / ".incfs" / "status").read_text())

    def pending(self) -> list[str]:
        return (self.path / ".incfs" / "pending").read_text().splitlines()

    def stop(self) -> None:
        """Unmount cleanly if possible, lazily if not; the daemon is gone after.

        A daemon can outlive a clean unmount: when another process made a
        mount namespace while the mount existed (`ip netns exec`, as the
        network tests do, with / mounted private), its copy keeps the FUSE
        connection open until that process exits. Every fill was synced
        before it was acknowledged, so the daemon is then simply killed
        (the image lock must go before a remount)."""
        if is_mounted(self.path):
            try:
                umount(str(self.path), timeout=UMOUNT_GRACE)
            except Exception:
                pass
        force_unmount(self.path, self.pid, grace=0.5)

    def restart(self, **changes) -> "Mount":
        """Unmount and mount the same source and backing image again."""
        self.stop()
        for key, value in changes.items():
            setattr(self.config, key, value)
        return self.start()


@contextlib.contextmanager
def mounted(base: str | os.PathLike | None = None, source: str = "empty", *,
            name: str = "mnt", cache: str | os.PathLike | None = None,
            keep_cache: bool = False, **options) -> Iterator[Mount]:
    """Mount `source` ("empty" or an image path) at base/name and always
    unmount afterwards (`fusermount3 -u -z` and SIGKILL as last resorts).
    Other options are MountConfig fields (read_timeout defaults to 60 s).

    Without `base` a temporary directory is made (and removed after). For
    "empty" the backing image defaults to base/name.img (the seed's
    `<mount_dir>.img`); it is deleted afterwards unless keep_cache is set,
    so big test images do not pile up in pytest's kept temp dirs."""
    if base is None:
        with tempfile.TemporaryDirectory(prefix="incfs-test-") as tmp:
            with mounted(tmp, source, name=name, cache=cache, keep_cache=keep_cache,
                         **options) as m:
                yield m
        return
    base = Path(base)
    mountpoint = base / name
    mountpoint.mkdir(parents=True, exist_ok=True)
    if source == "empty" and cache is None:
        cache = base / f"{name}.img"
    options.setdefault("read_timeout", LONG_TIMEOUT)
    config = MountConfig(source=str(source), mountpoint=str(mountpoint),
                         cache=str(cache) if cache else None, **options)
    m = Mount(config)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        if source == "empty" and not keep_cache and cache:
            Path(cache).unlink(missing_ok=True)


@pytest.fixture
def mounts(tmp_path):
    """Factory fixture: `mounts(**options)` mounts (default: an empty mount
    with its own backing image) and everything is unmounted at teardown."""
    count = 0
    with contextlib.ExitStack() as stack:
        def make(source: str = "empty", **options) -> Mount:
            nonlocal count
            count += 1
            options.setdefault("name", f"mnt{count}")
            return stack.enter_context(mounted(tmp_path, source, **options))
        yield make


@pytest.fixture
def empty_mount(mounts) -> Mount:
    return mounts()


# --- the seed's data --------------------------------------------------------------

LCG_A, LCG_C, U32 = 1103515245, 12345, 0xFFFFFFFF


def rnd_buf(length: int, seed: int) -> bytes:
    """incfs_test.c rnd_buf(), byte for byte (pure Python: the reference)."""
    out = bytearray(length)
    seed &= U32
    for i in range(length):
        seed = (LCG_A * seed + LCG_C) & U32
        out[i] = (seed >> (i % 13)) & 0xFF
    return bytes(out)


if np is not None:
    # seed_i = A_i * seed_0 + C_i (mod 2**32): the LCG unrolled, one row per block
    _A = np.empty(BLOCK_SIZE, np.uint32)
    _C = np.empty(BLOCK_SIZE, np.uint32)
    _a, _c = 1, 0
    for _i in range(BLOCK_SIZE):
        _a, _c = (LCG_A * _a) & U32, (LCG_A * _c + LCG_C) & U32
        _A[_i], _C[_i] = _a, _c
    _SHIFT = (np.arange(BLOCK_SIZE) % 13).astype(np.uint32)


def rnd_blocks(seeds: Iterable[int]) -> list[bytes]:
    """rnd_buf(4096, seed) for many seeds at once."""
    seeds = [s & U32 for s in seeds]
    if np is None:
        return [rnd_buf(BLOCK_SIZE, s) for s in seeds]
    v = _A[None, :] * np.asarray(seeds, np.uint32)[:, None]
    v += _C[None, :]
    v >>= _SHIFT[None, :]
    raw = v.astype(np.uint8).tobytes()
    return [raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(len(seeds))]


def shuffle(array: list, seed: int) -> list:
    """incfs_test.c shuffle(): the same permutation for the same seed (in place)."""
    count = len(array)
    seed &= U32
    for i in range(count - 1):
        items_left = count - i
        seed = (LCG_A * seed + LCG_C) & U32
        j = i + seed % items_left
        array[i], array[j] = array[j], array[i]
    return array


def block_seed(ino: int, index: int) -> int:
    """get_file_block_seed()."""
    return (7919 * ino + index) & U32


@dataclass
class SeedFile:
    """struct test_file: a name, a size and (once created) an inode."""

    name: str
    size: int
    ino: int = 0

    @property
    def blocks(self) -> int:
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def block_size(self, index: int) -> int:
        return min(BLOCK_SIZE, self.size - index * BLOCK_SIZE)


def full_set() -> list[SeedFile]:
    """get_test_files_set(), 500 MiB file included."""
    b = BLOCK_SIZE
    return [SeedFile("file_one_byte", 1), SeedFile("file_one_block", b),
            SeedFile("file_one_and_a_half_blocks", b + b // 2),
            SeedFile("file_three", 300 * b + 3), SeedFile("file_four", 400 * b + 7),
            SeedFile("file_five", 500 * b + 7), SeedFile("file_six", 600 * b + 7),
            SeedFile("file_seven", 700 * b + 7), SeedFile("file_eight", 800 * b + 7),
            SeedFile("file_nine", 900 * b + 7), SeedFile("file_big", 500 * MiB)]


def small_set() -> list[SeedFile]:
    """get_small_test_files_set()."""
    return full_set()[:5]


def expected_blocks(f: SeedFile, indexes: Iterable[int]) -> list[bytes]:
    """The plain content of blocks of a seed file (tail block cut to size)."""
    indexes = list(indexes)
    full = rnd_blocks(block_seed(f.ino, i) for i in indexes)
    return [blk[:f.block_size(i)] for i, blk in zip(indexes, full)]


def compression_of(f: SeedFile, index: int) -> str:
    """The seed compresses when (ino + block_index) % 2 == 0 (LZ4 there);
    here those blocks alternate between LZ4 and zstd, the rest go raw."""
    if (f.ino + index) % 2:
        return "none"
    return "lz4" if ((f.ino + index) // 2) % 2 == 0 else "zstd"


_zstd = zstandard.ZstdCompressor(level=1, write_content_size=False, write_checksum=False)


def encode(plain: bytes, compression: str) -> bytes:
    """A block as a loader sends it. Like the seed, blocks are sent
    compressed even when that does not shrink them (the daemon then stores
    them raw)."""
    if compression == "lz4":
        return lz4.block.compress(plain, store_size=False)
    if compression == "zstd":
        return _zstd.compress(plain)
    return plain


def make_blocks(f: SeedFile, indexes: Iterable[int]) -> list[tuple[int, bytes, str]]:
    """emit_test_blocks(): (index, data, compression) tuples for fill_blocks."""
    indexes = list(indexes)
    out = []
    for i, plain in zip(indexes, expected_blocks(f, indexes)):
        kind = compression_of(f, i)
        out.append((i, encode(plain, kind), kind))
    return out



def emit_test_blocks(client: Client, f: SeedFile, indexes: Iterable[int],
                     batch: int = 1024) -> int:
    """Fill blocks of `f` in batches; returns how many were newly stored."""
    indexes = list(indexes)
    stored = 0
    for start in range(0, len(indexes), batch):
        stored += client.fill_blocks(f.ino, make_blocks(f, indexes[start:start + batch]))
    return stored


def emit_test_file_data(client: Client, f: SeedFile, batch: int = 1024) -> int:
    """emit_test_file_data(): every block, shuffled with the inode as seed."""
    if f.size == 0:
        return 0
    return emit_test_blocks(client, f, shuffle(list(range(f.blocks)), f.ino), batch)


def create_files(client: Client, files: Iterable[SeedFile], parent: int = ROOT_INO) -> None:
    """emit_file() for each file; fills in `ino`."""
    for f in files:
        f.ino = client.create_file(parent, f.name, f.size)


# --- validation -------------------------------------------------------------------

def validate_file(mountpoint: str | os.PathLike, f: SeedFile, shuffle_seed: int = 0,
                  sample: int | None = None) -> None:
    """validate_test_file_content_with_seed(): the size, then each block read
    on its own (in shuffled order when `shuffle_seed`), compared with
    rnd_buf. Stricter than the seed: a read must return the whole block.

    Without a shuffle the blocks are read in order, many per pread (the same
    bytes compared, a lot fewer round trips). `sample` limits a shuffled
    check to the first `sample` blocks of the order plus the last block."""
    path = os.path.join(mountpoint, f.name)
    actual = os.stat(path).st_size
    assert actual == f.size, f"{f.name}: size {actual}, expected {f.size}"
    if f.size == 0:
        return
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        if not shuffle_seed:
            step = 256
            for first in range(0, f.blocks, step):
                indexes = range(first, min(f.blocks, first + step))
                want = b"".join(expected_blocks(f, indexes))
                got = _pread_all(fd, len(want), first * BLOCK_SIZE)
                if got != want:
                    bad = next(i for i in indexes if got[(i - first) * BLOCK_SIZE:][:BLOCK_SIZE]
                               != want[(i - first) * BLOCK_SIZE:][:BLOCK_SIZE])
                    raise AssertionError(f"{f.name}: block {bad} differs")
            assert os.pread(fd, 1, f.size) == b"", f"{f.name}: data past EOF"
            return
        order = shuffle(list(range(f.blocks)), shuffle_seed)
        if sample is not None and sample < len(order):
            order = order[:sample] + [f.blocks - 1]
        for first in range(0, len(order), 256):
            chunk = order[first:first + 256]
            for index, want in zip(chunk, expected_blocks(f, chunk)):
                got = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
                assert got == want, f"{f.name}: block {index} differs ({len(got)} bytes read)"


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_whole_file(path: str | os.PathLike) -> int:
    """read_whole_file(): bytes read in 16 KiB reads (raises on error)."""
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while True:
            chunk = fh.read(16 * 1024)
            if not chunk:
                return total
            total += len(chunk)


# --- loaders and readers in forked children ----------------------------------------

def fork_child(fn: Callable, *args, **kwargs) -> int:
    """Run fn in a forked child; it exits 0 when fn returns, 1 on an
    exception (traceback on stderr). Never returns into pytest in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fn(*args, **kwargs)
        code = 0
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def wait_child(pid: int, timeout: float = 300.0) -> int:
    """The exit status of a forked child (SIGKILLs it after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.02)


def kill_children(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def data_producer(mountpoint: str | os.PathLike, files: Iterable[SeedFile],
                  stop_flag: str | os.PathLike, share: tuple[int, int] | None = None,
                  idle: float = 0.5) -> int:
    """data_producer(): answer pending reads with the seed's blocks until
    `stop_flag` exists and nothing was pending for `idle` seconds.

    Each producer sees every pending read once (its own `after_serial`).
    With share=(k, n) it answers reads whose serial % n == k, and every 7th
    serial too, so concurrent duplicate fills (silent no-ops) happen.
    Returns how many blocks it stored."""
    by_ino = {f.ino: f for f in files}
    stored = 0
    last = 0
    with Client.connect(mountpoint, timeout=120) as client:
        while True:
            reads = client.pending_reads(timeout=idle, after_serial=last)
            if not reads:
                if os.path.exists(stop_flag):
                    return stored
                continue
            last = max(r.serial for r in reads)
            wanted: dict[int, set[int]] = {}
            for r in reads:
                if share and r.serial % share[1] != share[0] and r.serial % 7:
                    continue
                assert r.tree == 0, f"hash block asked for: {r}"
                wanted.setdefault(r.ino, set()).add(r.block)
            for ino, blocks in wanted.items():
                stored += emit_test_blocks(client, by_ino[ino], sorted(blocks), batch=1024)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def errno_of(fn: Callable, *args, **kwargs) -> int:
    """The errno fn raises (0 if it does not raise)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno
    return 0

