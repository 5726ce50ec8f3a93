#!/usr/bin/env python3
"""Crash-consistency harness: kill -9 the mount daemon at random moments, tear
the backing image the way a power cut would, remount, and check that nothing
acknowledged was lost and nothing wrong is ever read.

    .venv/bin/python bench/crash.py [--kills 200] [--seed 1] [--tear 0.35]
                                    [--max-run 1.2] [--dir DIR] [--json OUT]

Each round:

1. start the daemon (`python -m incfs.mount CONFIG READY_FD`, source "empty",
   cache = the backing image) and wait for READY;
2. start a loader process (fills blocks through the control protocol; after
   each `fill_blocks` returns it appends the acknowledged block ids to an
   acks file and fsyncs it) and two reader processes (pread random ranges of
   the files through FUSE and compare them with the known content);
3. after a random delay, SIGKILL the daemon, `fusermount3 -u -z` the dead
   mount, and collect loader and readers (a reader that ever read a wrong
   byte, or got EIO from a live mount, exits with status 3);
4. sometimes tear the image: forget the last 4-60 acknowledgements (as if
   the power went before the loader heard them), find the durable point D
   (the end of the last record that holds a still-acknowledged block or name:
   every fill fdatasyncs before it answers, so everything up to D is on disk)
   and then truncate the image at a random length >= D, or overwrite [x, end)
   with zeros or garbage for a random x >= D;
5. open the image offline (read-only, as `incfs verify` would) with no repair
   step and check every acknowledged name and block is present and reads back
   right, and every present block reads back right.

The next round remounts the same image (the writable open cuts a torn tail).
Exit status 0 when no round found a violation. The file contents are a pure
function of the file number, so every process knows what each block must be.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from incfs import BLOCK_SIZE, ROOT_INO, codec  # noqa: E402
from incfs.format.records import BlockKind  # noqa: E402

COMPRESSIONS = ["none", "lz4", "zstd"]
KINDS = {"none": BlockKind.RAW, "lz4": BlockKind.LZ4, "zstd": BlockKind.ZSTD}
READ_TIMEOUT = 3.0  # seconds a reader waits for an absent block (then ETIME)
LOADER_FAILED = 3
READER_FAILED = 3


# --- the content every process agrees on ----------------------------------------

@functools.lru_cache(maxsize=256)
def file_plan(k: int) -> tuple[str, int, bool]:
    """(name, size, has a Merkle tree) of file number k."""
    rng = random.Random(f"incfs-crash-plan-{k}")
    blocks = rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 200)])
    tail = rng.choice([BLOCK_SIZE, rng.randint(1, BLOCK_SIZE)])
    return f"f{k:05d}", (blocks - 1) * BLOCK_SIZE + tail, k % 3 != 2


@functools.lru_cache(maxsize=64)
def content(k: int) -> bytes:
    """The bytes of file number k: random, zero, text and half-zero blocks."""
    _name, size, _tree = file_plan(k)
    rng = random.Random(f"incfs-crash-data-{k}")
    out = bytearray()
    words = [b"alpha ", b"beta ", b"incfs ", b"block ", b"merkle ", b"crash\n"]
    while len(out) < size:
        kind = rng.randrange(4)
        if kind == 0:
            out += rng.randbytes(BLOCK_SIZE)
        elif kind == 1:
            out += bytes(BLOCK_SIZE)
        elif kind == 2:
            out += b"".join(rng.choice(words) for _ in range(700))[:BLOCK_SIZE]
        else:
            out += rng.randbytes(BLOCK_SIZE // 2) + bytes(BLOCK_SIZE // 2)
    return bytes(out[:size])


@functools.lru_cache(maxsize=64)
def tree_of(k: int) -> tuple[bytes, list[bytes]]:
    from incfs.integrity.merkle import tree_of_bytes
    return tree_of_bytes(content(k))


def block_of(k: int, index: int) -> bytes:
    return content(k)[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]


def number_of(name: str) -> int | None:
    if len(name) == 6 and name[0] == "f" and name[1:].isdigit():
        return int(name[1:])
    return None


# --- the loader (a child process) ----------------------------------------------

def loader_main(mountpoint: str, acks_path: str, seed: int) -> int:
    """Fill files f00000, f00001, ... block by block, pending reads first,
    logging every acknowledged block to `acks_path` (fsync'ed)."""
    from incfs.control import Client
    from incfs.control.client import FillError

    rng = random.Random(seed)
    acks = os.open(acks_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def ack(lines: list[str]) -> None:
        os.write(acks, "".join(line + "\n" for line in lines).encode())
        os.fsync(acks)

    try:
        client = Client.connect(mountpoint, timeout=30)
    except OSError:
        return 0  # the daemon is already gone
    known: dict[int, int] = {}  # ino -> file number

    def fill(ino: int, k: int, items: list[tuple[int, str]]) -> None:
        blocks = []
        for index, tree in items:
            if tree == "hash":
                blocks.append((index, tree_of(k)[1][index], "none", "hash"))
            else:
                comp = rng.choice(COMPRESSIONS)
                _kind, stored = codec.compress(block_of(k, index), KINDS[comp])
                if _kind is not KINDS[comp]:
                    comp, stored = "none", block_of(k, index)
                blocks.append((index, stored, comp, "data"))
        client.fill_blocks(ino, blocks)  # returns only once the image is synced
        name = file_plan(k)[0]
        ack([f"block {name} {ino} {1 if tree == 'hash' else 0} {index}" for index, tree in items])

    def serve_pending() -> None:
        for pr in client.pending_reads(timeout=0):
            k = known.get(pr.ino)
            if k is not None:
                fill(pr.ino, k, [(pr.block, "hash" if pr.tree else "data")])

    try:
        k = 0
        while True:
            name, size, has_tree = file_plan(k)
            try:
                ino = client.lookup(ROOT_INO, name)
            except FileNotFoundError:
                root = tree_of(k)[0] if has_tree else None
                ino = client.create_file(ROOT_INO, name, size, root_hash=root)
                ack([f"create {name} {ino}"])
            known[ino] = k
            hashes = tree_of(k)[1] if has_tree else []
            if hashes:  # top first; present ones are a no-op
                fill(ino, k, [(i, "hash") for i in range(len(hashes))])
            present = set()
            for a, b in client.filled_ranges(ino):
                present.update(range(a, b))
            todo = [i for i in range((size + BLOCK_SIZE - 1) // BLOCK_SIZE) if i not in present]
            rng.shuffle(todo)
            while todo:
                serve_pending()
                batch = todo[:rng.randint(1, 8)]
                todo = todo[len(batch):]
                fill(ino, k, [(i, "data") for i in batch])
            k += 1
    except FillError as e:
        print(f"loader: a correct block was refused: {e} {e.result}", file=sys.stderr)
        return LOADER_FAILED
    except (OSError, ConnectionError, ValueError):
        return 0  # the daemon died under us: expected
    finally:
        os.close(acks)


# --- a reader (a child process) -------------------------------------------------

def _mount_alive(mountpoint: str) -> bool:
    try:
        os.stat(os.path.join(mountpoint, ".incfs", "control"))
        return True
    except OSError:
        return False


def reader_main(mountpoint: str, seed: int, report_path: str) -> int:
    """Read random ranges of the files and compare with their content until
    the mount dies. Exit 3 on a wrong byte, or EIO from a live mount."""
    rng = random.Random(seed)
    counts = {"reads": 0, "bytes": 0, "timeouts": 0}

    def report(code: int, why: str = "") -> int:
        counts["why"] = why
        Path(report_path).write_text(json.dumps(counts))
        return code

    while True:
        try:
            names = [n for n in os.listdir(mountpoint) if number_of(n) is not None]
        except OSError:
            return report(0)
        if not names:
            if not _mount_alive(mountpoint):
                return report(0)  # lazily unmounted: this is the bare directory
            time.sleep(0.01)
            continue
        name = rng.choice(names)
        k = number_of(name)
        want = content(k)
        offset = rng.randrange(len(want))
        length = rng.choice([1, 100, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, 64 * 1024])
        try:
            fd = os.open(os.path.join(mountpoint, name), os.O_RDONLY)
        except OSError:
            if not _mount_alive(mountpoint):
                return report(0)
            continue
        try:
            got = os.pread(fd, length, offset)
        except OSError as e:
            if e.errno == errno.ETIME:
                counts["timeouts"] += 1
                continue
            if not _mount_alive(mountpoint):
                return report(0)
            return report(READER_FAILED, f"{name} @{offset}+{length}: {e!r} from a live mount")
        finally:
            try:
                os.close(fd)  # a FUSE close sends FLUSH: ENOTCONN once the daemon is dead
            except OSError:
                pass
        expected = want[offset:offset + length]
        if got != expected[:len(got)]:
            first = next(i for i in range(len(got)) if got[i] != expected[i])
            return report(READER_FAILED, f"{name} @{offset}+{length}: WRONG BYTES from byte "
                                         f"{first} of {len(got)} (file offset {offset + first})")
        if len(got) < len(expected):
            if not _mount_alive(mountpoint):
                return report(0)  # cut short by the kill: nothing wrong was returned
            return report(READER_FAILED, f"{name} @{offset}+{length}: short read "
                                         f"({len(got)} of {len(expected)}) from a live mount")
        counts["reads"] += 1
        counts["bytes"] += len(got)


# --- the harness -----------------------------------------------------------------

@dataclasses.dataclass
class Figures:
    rounds: int = 0
    kills: int = 0
    remounts: int = 0
    tears: dict = dataclasses.field(default_factory=dict)
    acked_blocks: int = 0
    acked_files: int = 0
    blocks_checked: int = 0  # offline read-backs, summed over rounds
    reader_reads: int = 0
    reader_bytes: int = 0
    reader_timeouts: int = 0
    dropped_bytes: int = 0  # torn tail bytes the opens dropped
    lost_acked: int = 0  # must stay 0
    wrong_blocks: int = 0  # must stay 0
    violations: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Harness:
    def __init__(self, workdir: Path, seed: int, tear_rate: float, max_run: float,
                 log=print):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mountpoint = self.dir / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.image = self.dir / "backing.img"
        self.acks = self.dir / "acks.log"
        self.daemon_log = self.dir / "daemon.log"
        self.rng = random.Random(seed)
        self.seed = seed
        self.tear_rate = tear_rate
        self.max_run = max_run
        self.log = log
        self.fig = Figures()
        self.daemon: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []

    # --- processes ------------------------------------------------------------

    def start_daemon(self) -> None:
        config = {"source": "empty", "mountpoint": str(self.mountpoint),
                  "cache": str(self.image), "read_timeout": READ_TIMEOUT}
        read_end, write_end = os.pipe()
        with open(self.daemon_log, "ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "incfs.mount", json.dumps(config), str(write_end)],
                pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=_child_env())
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            line = pipe.readline().decode(errors="replace").strip()
        if line != "READY":
            self.daemon.wait(timeout=30)
            raise RuntimeError(f"mount did not come up: {line or 'no answer'}; "
                               f"log tail:\n{_tail(self.daemon_log)}")

    def spawn(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(HERE), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=_child_env())
        self.children.append(proc)
        return proc

    def kill_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait()
            self.fig.kills += 1
        self.daemon = None
        lazy_unmount(self.mountpoint)

    def reap_children(self, timeout: float = 60.0) -> list[tuple[str, int, str]]:
        out = []
        deadline = time.monotonic() + timeout
        for proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                out.append((proc.args[2], -9, "did not stop after the mount died"))
                continue
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.stderr:
                proc.stderr.close()
            out.append((proc.args[2], proc.returncode, err))
        self.children = []
        return out

    def cleanup(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        lazy_unmount(self.mountpoint)
        self.reap_children(timeout=5)

    # --- one round ------------------------------------------------------------

    def round(self) -> None:
        r = self.fig.rounds
        self.fig.rounds += 1
        self.start_daemon()
        self.fig.remounts += 1 if r else 0
        self.spawn("loader", str(self.mountpoint), str(self.acks), str(self.seed * 100003 + r))
        reports = [self.dir / f"reader{i}.json" for i in range(2)]
        for i, rep in enumerate(reports):
            rep.unlink(missing_ok=True)
            self.spawn("reader", str(self.mountpoint), str(self.seed * 7919 + r * 2 + i), str(rep))
        # a random moment: sometimes while the loader is still connecting
        delay = self.rng.choice([self.rng.uniform(0, 0.05), self.rng.uniform(0, self.max_run)])
        time.sleep(delay)
        self.kill_daemon()
        for what, code, err in self.reap_children():
            if code not in (0, None):
                self.violation(f"round {r}: {what} exited {code}: {err.strip()[-500:]}")
        for rep in reports:
            if rep.exists():
                data = json.loads(rep.read_text())
                self.fig.reader_reads += data["reads"]
                self.fig.reader_bytes += data["bytes"]
                self.fig.reader_timeouts += data["timeouts"]
                if data.get("why"):
                    self.violation(f"round {r}: reader: {data['why']}")
        if self.rng.random() < self.tear_rate:
            self.tear()
        self.check_offline()

    def violation(self, what: str) -> None:
        self.fig.violations.append(what)
        self.log(f"VIOLATION: {what}")

    # --- what was acknowledged ---------------------------------------------------

    def acked(self) -> tuple[dict[str, int], set[tuple[int, int, int]], dict[int, str]]:
        files: dict[str, int] = {}
        blocks: set[tuple[int, int, int]] = set()
        names: dict[int, str] = {}
        if not self.acks.exists():
            return files, blocks, names
        for line in self.acks.read_text().splitlines():
            parts = line.split()
            if parts[0] == "create":
                files[parts[1]] = int(parts[2])
                names[int(parts[2])] = parts[1]
            elif parts[0] == "block":
                ino = int(parts[2])
                blocks.add((ino, int(parts[3]), int(parts[4])))
                names[ino] = parts[1]
        return files, blocks, names

    # --- power loss -------------------------------------------------------------------

    def durable_point(self) -> int:
        """The end of the last record that holds something acknowledged: every
        acknowledged change was fdatasync'ed, so all bytes before it are on disk."""
        from incfs.format import records
        from incfs.format.layout import LOG_START, RecordType
        from incfs.format.log import scan_log

        files, blocks, _names = self.acked()
        inos = set(files.values())
        point = LOG_START

        def sink(offset, header, body):
            nonlocal point
            end = offset + header.length
            if end <= point:
                return
            if header.type == RecordType.BLOCKS:
                for run in records.decode_runs(body):
                    for i in range(len(run.blocks)):
                        if (run.ino, int(run.tree), run.first + i) in blocks:
                            point = end
                            return
            elif header.type == RecordType.DIRENTS:
                if any(d.child in inos for d in records.decode_dirents(body)):
                    point = end
            elif header.type == RecordType.INODES and offset == LOG_START:
                point = end  # the root directory

        size = self.image.stat().st_size
        with open(self.image, "rb") as f:
            scan_log(f, size, sink)
        return point

    def tear(self) -> None:
        # Forget the last few answers (as if the power went before the loader
        # heard them): what they covered is now fair game for the tear too.
        lines = self.acks.read_text().splitlines(keepends=True) if self.acks.exists() else []
        keep = max(0, len(lines) - self.rng.randint(4, 60))
        with open(self.acks, "w") as f:
            f.writelines(lines[:keep])
            f.flush()
            os.fsync(f.fileno())
        size = self.image.stat().st_size
        point = self.durable_point()
        if point >= size:
            self.fig.tears["nothing_after_durable_point"] = \
                self.fig.tears.get("nothing_after_durable_point", 0) + 1
            return
        mode = self.rng.choice(["truncate", "zeros", "garbage"])
        at = self.rng.randint(point, size)
        with open(self.image, "r+b") as f:
            if mode == "truncate":
                f.truncate(at)
            else:
                f.seek(at)
                n = size - at
                f.write(bytes(n) if mode == "zeros" else random.Random(at).randbytes(n))
            f.flush()
            os.fsync(f.fileno())
        self.fig.tears[mode] = self.fig.tears.get(mode, 0) + 1

    # --- the offline check --------------------------------------------------------------

    def check_offline(self) -> None:
        from incfs.errors import IncfsError
        from incfs.image import Image, MissingBlock

        files, blocks, names = self.acked()
        self.fig.acked_files = len(files)
        self.fig.acked_blocks = len(blocks)
        try:
            img = Image.open(self.image)  # read-only, no repair of any kind
        except IncfsError as e:
            self.violation(f"round {self.fig.rounds - 1}: image does not open: {e}")
            return
        with img:
            self.fig.dropped_bytes += img.scan.dropped_bytes
            for name, ino in files.items():
                try:
                    node = img.ns.lookup(ROOT_INO, name.encode())
                except OSError:
                    self.lost(f"acknowledged file {name} (ino {ino}) is gone")
                    continue
                if node.ino != ino:
                    self.lost(f"{name} is inode {node.ino}, acknowledged as {ino}")
            for ino, tree, index in sorted(blocks):
                node = img.ns.inodes.get(ino)
                bmap = None if node is None else (node.hashes if tree else node.data)
                if bmap is None or not bmap.is_present(index):
                    self.lost(f"acknowledged block ino {ino} tree {tree} #{index} is absent")
            for node in list(img.ns.inodes.values()):
                if node.data is None or not node.data.present:
                    continue  # (an unnamed inode a kill left between its two records)
                k = number_of(names.get(node.ino, ""))
                if k is None:
                    try:
                        k = number_of(img.ns.path_of(node.ino).lstrip(b"/").decode())
                    except OSError:
                        k = None
                if k is None:
                    self.violation(f"unknown file inode {node.ino} in the image")
                    continue
                for i, *_rest in list(node.data.entries()):
                    try:
                        got = img.read_block(node, i)
                    except MissingBlock:
                        continue  # a hash block it needs is not there yet
                    except IncfsError as e:
                        self.fig.wrong_blocks += 1
                        self.violation(f"inode {node.ino} block {i} does not read back: {e}")
                        continue
                    self.fig.blocks_checked += 1
                    if got != block_of(k, i):
                        self.fig.wrong_blocks += 1
                        self.violation(f"inode {node.ino} block {i}: WRONG DATA")

    def lost(self, what: str) -> None:
        self.fig.lost_acked += 1
        self.violation(f"round {self.fig.rounds - 1}: {what}")

    def run(self, rounds: int, progress_every: int = 10) -> Figures:
        started = time.monotonic()
        try:
            for r in range(rounds):
                self.round()
                if progress_every and (r + 1) % progress_every == 0:
                    self.log(f"round {r + 1}/{rounds}: kills {self.fig.kills}, acked blocks "
                             f"{self.fig.acked_blocks}, reader reads {self.fig.reader_reads}, "
                             f"tears {self.fig.tears}, violations {len(self.fig.violations)}")
        finally:
            self.cleanup()
            self.fig.seconds = round(time.monotonic() - started, 1)
        return self.fig


def is_mounted(mountpoint: Path) -> bool:
    """From the mount table: os.path.ismount says False for a dead FUSE
    mount (its stat fails with ENOTCONN)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].replace("\\040", " ") == target:
                return True
    return False


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a (dead) mount; quiet when nothing is mounted there."""
    for _ in range(100):
        if not is_mounted(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.02)
    raise RuntimeError(f"{mountpoint} stays mounted")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    if argv[:1] == ["loader"]:
        return loader_main(argv[1], argv[2], int(argv[3]))
    if argv[:1] == ["reader"]:
        return reader_main(argv[1], int(argv[2]), argv[3])
    if argv[:1] == ["space"]:  # releases, gc and compact: bench/crash_space.py
        sys.path.insert(0, str(HERE.parent))
        import crash_space
        return crash_space.main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=200, help="daemon kills (rounds)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tear", type=float, default=0.35, help="share of rounds that tear the image")
    ap.add_argument("--max-run", type=float, default=1.2, help="longest run before a kill (s)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        print("crash: needs /dev/fuse", file=sys.stderr)
        return 2
    # a SIGTERM must still unmount and stop the daemon (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="incfs-crash-"))
    harness = Harness(workdir, args.seed, args.tear, args.max_run)
    try:
        fig = harness.run(args.kills)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = fig.as_dict()
    summary["image_bytes"] = harness.image.stat().st_size if harness.image.exists() else None
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if fig.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
