"""The fetch pipeline (issue 10, item 1): request classes and the byte
budget (schedule.Slots), per-file sequential detection (schedule.Readahead),
and a real mount whose sequential reader is served by readahead within the
budget. Real trio objects and real mounts; no timings asserted."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess

import trio
import trio.testing

from incfs import BLOCK_SIZE
from incfs.loader import DEFAULTS, LoaderConfig
from incfs.loader.schedule import PREFETCH, READ, READAHEAD, Readahead, Slots
from incfs.mount import MountConfig
from incfs.pack import pack
from incfs.testing.nginx import Nginx

from test_loader_util import MiB, assert_cache_clean, make_tree, mounted, status


def test_defaults_have_one_home():
    """MountConfig and the CLI take the loader's defaults from LoaderConfig."""
    config = MountConfig(source="x", mountpoint="/m")
    for name in ("amplify", "max_inflight", "bandwidth", "prefetch", "inflight_budget",
                 "readahead_max"):
        assert getattr(config, name) == getattr(DEFAULTS, name), name
    assert DEFAULTS.inflight_budget == 64 * MiB
    settings = LoaderConfig.from_mount(MountConfig(source="x", mountpoint="/m", amplify=1))
    assert settings.amplify == 4096  # raised to its working minimum


def test_reads_jump_the_queue():
    order: list[str] = []

    async def main():
        slots = Slots(total=1, prefetch_max=1, budget=100)
        first = await slots.acquire(PREFETCH)

        async def take(level: int, name: str) -> None:
            got = await slots.acquire(level)
            order.append(name)
            slots.release_slot(got)

        async with trio.open_nursery() as nursery:
            for level, name in ((PREFETCH, "prefetch"), (READAHEAD, "readahead"), (READ, "read")):
                nursery.start_soon(take, level, name)
                await trio.testing.wait_all_tasks_blocked()
            assert order == []  # the one slot is busy
            slots.release_slot(first)

    trio.run(main)
    assert order == ["read", "readahead", "prefetch"]


def test_the_budget_holds_and_admits_one_big_job():
    async def main():
        slots = Slots(total=8, prefetch_max=8, budget=100)
        await slots.reserve(PREFETCH, 60)
        admitted = []

        async def reserve(nbytes: int) -> None:
            await slots.reserve(READ, nbytes)
            admitted.append(nbytes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reserve, 50)
            await trio.testing.wait_all_tasks_blocked()
            assert admitted == [] and slots.bytes == 60  # 110 > 100: waits
            slots.release_bytes(60)
        assert admitted == [50]
        slots.release_bytes(50)
        await slots.reserve(READ, 500)  # alone, larger than the budget: runs
        assert slots.peak_bytes == 500

    trio.run(main)


def test_a_read_waiting_for_budget_lets_its_holders_finish():
    """Jobs holding the budget wait only for slots; a read waiting for
    budget must not keep them from slots, or nothing would ever move."""
    done = []

    async def main():
        slots = Slots(total=1, prefetch_max=1, budget=100)
        await slots.reserve(READAHEAD, 100)  # a readahead job holds it all
        other = await slots.acquire(READ)  # ... and the one slot is busy

        async def read_job() -> None:
            await slots.reserve(READ, 10)
            done.append("read")

        async def readahead_job() -> None:
            level = await slots.acquire(READAHEAD)
            slots.release_slot(level)
            slots.release_bytes(100)
            done.append("readahead")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_job)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(readahead_job)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []
            slots.release_slot(other)
            await trio.testing.wait_all_tasks_blocked()
            assert done == ["readahead", "read"]

    trio.run(main)


def test_prefetch_waiting_is_promoted_when_a_read_wants_it():
    async def main():
        slots = Slots(total=1, prefetch_max=1, budget=1 << 20)
        held = await slots.acquire(READ)
        wanted = False
        result = []

        async def prefetch() -> None:
            result.append(await slots.acquire(PREFETCH, urgent=lambda: wanted))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetch)
            await trio.testing.wait_all_tasks_blocked()
            wanted = True
            slots.changed.notify()  # what the loader does when a read waits
            await trio.testing.wait_all_tasks_blocked()
            assert slots.waiting[READ] == 1  # promoted, waiting as a read
            slots.release_slot(held)
        assert result == [READ]

    trio.run(main)


def test_readahead_window_doubles_for_a_sequential_reader_and_resets_on_a_jump():
    launched: list[tuple[int, int, int]] = []
    ra = Readahead(start=64 * 1024, maximum=1 * MiB, launch=lambda *a: launched.append(a),
                   after=512 * 1024)
    step = 32  # 128 KiB reads
    for first in range(0, 96, step):  # 384 KiB in sequence: not yet
        ra.note_read(5, first, first + step - 1)
    assert launched == []
    for first in range(96, 4096, step):
        ra.note_read(5, first, first + step - 1)
    windows = [count for _, _, count in launched]
    assert windows[0] == 16 and max(windows) == MiB // BLOCK_SIZE
    assert windows == sorted(windows)  # only grows while the reader keeps up
    covered = 0
    for _ino, first, count in launched:  # forward, never overlapping
        assert first >= covered
        covered = first + count
    assert covered > 4096  # ahead of the reader
    launched.clear()
    ra.note_read(5, 100_000, 100_031)  # a jump: random again, window reset
    ra.note_read(5, 2000, 2031)  # a late read of the old stream changes nothing
    assert launched == []
    assert ra.streams[5].window == 64 * 1024


def test_random_clusters_get_no_readahead():
    launched = []
    ra = Readahead(start=256 * 1024, maximum=16 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB)
    rng = random.Random(1)
    for _ in range(200):
        start = rng.randrange(0, 1 << 20)
        for first in range(start, start + 128, 32):  # 512 KiB clusters
            ra.note_read(9, first, first + 31)
    assert launched == []


@contextlib.contextmanager
def _big_file_mounted(tmp_path, data: bytes, **options):
    """big.bin (`data`) packed, served by nginx and mounted lazily (prefetch
    none) with these MountConfig options; yields the mount point. The cache
    is checked clean after."""
    with _files_mounted(tmp_path, {"big.bin": data}, **options) as mnt:
        yield mnt


@contextlib.contextmanager
def _files_mounted(tmp_path, files: dict[str, bytes], **options):
    """`files` packed, served by nginx and mounted as `_big_file_mounted` does."""
    src = make_tree(tmp_path / "src", files)
    www = tmp_path / "www"
    www.mkdir()
    pack(src, www / "app.img", compress="none")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Nginx(www) as nginx:
        config = MountConfig(source=nginx.url("app.img"), mountpoint=str(mnt),
                             cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                             prefetch="none", read_timeout=60, **options)
        with mounted(config):
            yield mnt
    assert_cache_clean(tmp_path / "cache.img")


def test_a_sequential_reader_is_served_by_readahead_within_the_budget(tmp_path):
    data = random.Random(4).randbytes(24 * MiB)
    budget = 2 * MiB
    with _big_file_mounted(tmp_path, data, inflight_budget=budget,
                           readahead_max=4 * MiB) as mnt:
        with open(mnt / "big.bin", "rb") as f:
            got = b"".join(iter(lambda: f.read(128 * 1024), b""))
        assert got == data
        loader = status(mnt)["loader"]
        assert loader["readahead_jobs"] > 0
        assert loader["inflight_budget"] == budget
        assert loader["inflight_bytes_peak"] <= budget
        assert loader["inflight_bytes"] == 0


def _order(nfiles: int, blocks: int):
    from incfs.loader.schedule import SourceOrder

    base = 1 << 20
    start = {10 + k: base + k * blocks * BLOCK_SIZE for k in range(nfiles)}
    runs = [(start[ino], ino, 0, 0, blocks) for ino in start]
    return SourceOrder(runs, lambda ino, i: start[ino] + i * BLOCK_SIZE if ino in start
                       and 0 <= i < blocks else None, lambda ino: blocks if ino in start else 0)


def test_a_tree_walked_in_pack_order_is_read_ahead_across_files():
    launched, read_to = [], {}
    ra = Readahead(start=64 * 1024, maximum=1 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB)
    ra.order = _order(nfiles=40, blocks=8)  # 32 KiB files, one after another
    for ino in range(10, 30):
        for first in range(0, 8, 4):
            ra.note_read(ino, first, first + 3)
            read_to[ino] = first + 3
            # what is asked for lies past what the program has read
            assert all((i, f) > (ino, read_to[ino]) for i, f, _count in launched)
            launched.clear()
    assert ra.walk_ino == 29  # from file 11 on (file 10 was read whole first)
    assert ra.cross_window > 64 * 1024  # it grew while the walk went on
    assert ra.cross_front is not None and ra.cross_front <= (1 << 20) + 40 * 8 * BLOCK_SIZE


def test_a_walk_is_one_stream_over_the_source_without_gaps():
    """Big files read whole in pack order: from the walk's start on, the
    windows join up across file ends (no block left for a miss at each
    file's start, none asked for twice), and each ends on a leaf group or a
    file's end (its jobs build their leaf hash blocks)."""
    launched = []
    blocks = 2560  # 10 MiB files
    ra = Readahead(start=256 * 1024, maximum=4 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB, align=128)
    ra.order = _order(nfiles=8, blocks=blocks)
    for ino in range(10, 16):
        for first in range(0, blocks, 256):
            ra.note_read(ino, first, first + 255)
    walked = [(ino, b) for ino, first, count in launched if ino > 10
              for b in range(first, first + count)]
    assert len(walked) == len(set(walked))
    assert walked == sorted(walked)
    start = walked[0]
    assert start[0] == 11 and start[1] <= 256  # right after the walk's first read
    want = [(11, b) for b in range(start[1], blocks)] + \
        [(ino, b) for ino in range(12, 16) for b in range(blocks)]
    assert walked[:len(want)] == want
    assert all((first + count) % 128 == 0 or first + count == blocks
               for _ino, first, count in launched)


def test_a_walk_through_a_real_mount_serves_every_file_right(tmp_path):
    """Files read whole one after another: the walk's windows cross file
    ends (one job can hold the end of one file and the start of the next);
    every byte comes back right and the cache holds only verified blocks."""
    rng = random.Random(8)
    files = {f"f{k}.bin": rng.randbytes(1 * MiB + k * 12345) for k in range(8)}
    with _files_mounted(tmp_path, files, readahead_max=2 * MiB) as mnt:
        for name in sorted(files):
            with open(mnt / name, "rb") as f:
                assert b"".join(iter(lambda: f.read(128 * 1024), b"")) == files[name], name
        loader = status(mnt)["loader"]
        assert loader["readahead_walk_windows"] > 0
        assert loader["crc_failures"] == 0


def test_a_walk_whose_reader_is_held_up_keeps_the_link_busy_up_to_two_windows():
    """The reader waits on one slow request and reads nothing: as the
    window's other jobs end and the wire drains, the next window is asked
    for anyway (`landed`), but never more than two windows past the reader,
    and not while enough is still on the wire."""
    launched = []
    on_wire = [0]
    blocks = 2560  # 10 MiB files
    ra = Readahead(start=256 * 1024, maximum=1 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB, align=128, drained=lambda n: on_wire[0] < n)
    ra.order = _order(nfiles=8, blocks=blocks)
    for first in range(0, blocks, 256):  # file 10 whole, then the walk begins
        ra.note_read(10, first, first + 255)
    ra.note_read(11, 0, 255)
    assert ra.walk_ino == 11 and launched
    window, at = ra.cross_window, ra._walk_at
    front = ra.cross_front
    launched.clear()
    on_wire[0] = window  # plenty still coming: nothing more
    ra.landed()
    assert not launched and ra.cross_front == front
    on_wire[0] = 0  # drained, the reader still where it was
    for _ in range(10):
        ra.landed()
    assert launched and ra.held_windows >= 1
    assert ra.cross_front - at <= 2 * window + 128 * BLOCK_SIZE  # (a window ends on a leaf group)
    asked = [(ino, b) for ino, first, count in launched for b in range(first, first + count)]
    assert asked == sorted(asked) and len(asked) == len(set(asked))
    assert min(asked) > (11, 255)


def test_a_walk_starts_as_wide_as_the_reads_of_its_first_file():
    """Small files read whole in one kernel read each: the walk's first
    window holds the whole next file, so that file's first read finds none
    of itself neither here nor on its way (such a read would be refused and
    the file read page by page: Service._spares)."""
    launched = []
    ra = Readahead(start=256 * 1024, maximum=4 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB, align=128)
    ra.order = _order(nfiles=8, blocks=164)  # 656 KiB files: less than `after`
    ra.note_read(10, 0, 163)
    ra.note_read(11, 0, 163)
    assert ra.walk_ino == 11
    covered = {(ino, b) for ino, first, count in launched for b in range(first, first + count)}
    assert {(12, b) for b in range(164)} <= covered


def test_a_file_opened_in_passthrough_counts_as_read_whole_for_a_walk():
    """The kernel reads a passthrough file without us: the walk goes on past
    it instead of ending (as a reader that skipped a file would end it)."""
    launched = []
    ra = Readahead(start=256 * 1024, maximum=4 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB, align=128)
    ra.order = _order(nfiles=8, blocks=164)
    for ino in (10, 11):
        ra.note_read(ino, 0, 163)
    ra.note_passthrough(12)
    assert ra.walk_ino == 12
    launched.clear()
    ra.note_read(13, 0, 163)
    assert ra.walk_ino == 13
    assert launched and all(ino >= 14 for ino, _first, _count in launched)


def test_small_files_read_whole_in_pack_order_are_not_read_page_by_page(tmp_path):
    """Over a link with a round trip, files a little smaller than a kernel
    read, read whole one after another: the walk has each next file on its
    way when the kernel asks for it whole, so that read waits for it rather
    than being refused. A refusal would make the kernel read the rest of the
    file a page at a time (and quarter its readahead): ~160 reads a file."""
    rng = random.Random(9)
    files = {f"d/f{k:02d}.bin": rng.randbytes(656 * 1024) for k in range(24)}
    with _mounted_behind_proxy(tmp_path, files, "none", delay_down=0.02) as mnt:
        for name in sorted(files):
            with open(mnt / name, "rb") as f:
                assert b"".join(iter(lambda: f.read(MiB), b"")) == files[name], name
        st = status(mnt)
    assert st["loader"]["readahead_walk_windows"] > 0
    # each file: one kernel read, maybe a few (the first ones, before the walk)
    assert st["reads"] <= 4 * len(files), st["reads"]
    assert_cache_clean(tmp_path / "cache.img")


def test_a_jump_inside_a_walked_file_ends_the_walk():
    launched = []
    ra = Readahead(start=256 * 1024, maximum=4 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB, align=128)
    ra.order = _order(nfiles=8, blocks=2560)
    for ino in (10, 11):
        for first in range(0, 2560, 256):
            ra.note_read(ino, first, first + 255)
    ra.note_read(12, 0, 255)
    assert ra.walk_ino == 12
    launched.clear()
    ra.note_read(12, 2000, 2003)  # far ahead of where the walk is
    assert ra.walk_ino is None and launched == []


def test_files_read_out_of_pack_order_get_no_cross_file_readahead():
    launched = []
    ra = Readahead(start=64 * 1024, maximum=1 * MiB, launch=lambda *a: launched.append(a),
                   after=1 * MiB)
    ra.order = _order(nfiles=40, blocks=8)
    for ino in range(10, 50, 10):  # every tenth file, whole
        ra.note_read(ino, 0, 7)
    for ino in (31, 32):  # the first file only partly read: no walk either
        ra.note_read(ino, 0, 3)
    assert launched == []


def test_a_read_refused_for_its_absent_tail_has_that_tail_fetched_at_once(tmp_path):
    """A kernel read whose first block is here but whose tail is not gets EIO,
    so that the kernel asks again page by page (Service.read, spare_tail);
    the tail is fetched right then, not one miss per page read."""
    data = random.Random(5).randbytes(8 * MiB)
    with _big_file_mounted(tmp_path, data) as mnt:
        fd = os.open(mnt / "big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, BLOCK_SIZE, 2 * MiB) == data[2 * MiB:2 * MiB + BLOCK_SIZE]
            before = status(mnt)["loader"]["readahead_jobs"]
            # the page cache forgets it: the next read goes to the daemon
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            got = os.pread(fd, MiB, 2 * MiB)
        finally:
            os.close(fd)
        assert got == data[2 * MiB:3 * MiB]
        # not read from offset 0 and not sequential: only the refused
        # read's tail can have started readahead jobs
        assert status(mnt)["loader"]["readahead_jobs"] > before


def test_a_read_is_served_once_its_blocks_are_in_not_its_whole_range(tmp_path):
    """A miss fetches 1 MiB here (amplify), but the read of the first block
    returns while the proxy still holds the rest of that range: blocks are
    verified and stored as the body streams in (loader.arrivals). Released,
    the rest arrives, and every block stored is right."""
    from incfs.serve import RangeServer
    from incfs.testing.faultproxy import FaultProxy

    from test_loader_util import ReadThread

    data = random.Random(6).randbytes(4 * MiB)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(data)
    image = tmp_path / "app.img"
    pack(src, image, compress="none")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with RangeServer(image) as server:
        host, port = server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        with FaultProxy((host, int(port))) as proxy:
            config = MountConfig(source=proxy.url("/" + image.name), mountpoint=str(mnt),
                                 cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                                 prefetch="none", amplify=MiB, read_timeout=None)
            with mounted(config) as root:
                # past the metadata's answer (64 KiB, which holds the hash
                # blocks and the first data blocks: incfs.loader.tail) and
                # short of the 1 MiB range read at 256 KiB: a connection
                # stops mid-body there
                proxy.hold_after(512 * 1024)
                reader = ReadThread(root / "big.bin", 256 * 1024, BLOCK_SIZE)
                reader.start()
                reader.join(30)
                served_while_held, held = not reader.is_alive(), proxy.held
                proxy.release_held()
                reader.join(60)
                assert held >= 1, "the range was not held: nothing tested"
                assert served_while_held, "the read waited for the whole range"
                assert reader.error is None
                assert reader.result == data[256 * 1024:256 * 1024 + BLOCK_SIZE]
                assert (root / "big.bin").read_bytes() == data
                assert status(root)["loader"]["crc_failures"] == 0
    assert_cache_clean(tmp_path / "cache.img")


def test_sequential_prefetch_brings_whole_files_not_their_hash_trees_first(tmp_path):
    """Hash trees lie first in the source, a few KiB per file; fetched
    first, one job per file, they took a round trip each before any data
    came. Now a file's hash blocks come with its data: under a bandwidth cap
    that lets one prefetch job start and no second, that one job leaves a
    whole file here (hash-tree-first left none)."""
    files = {f"f{i:02d}.bin": random.Random(i).randbytes(64 * 1024) for i in range(12)}
    make_tree(tmp_path / "src", files)
    (tmp_path / "www").mkdir()
    pack(tmp_path / "src", tmp_path / "www" / "app.img", compress="none")
    (tmp_path / "mnt").mkdir()
    with Nginx(tmp_path / "www") as nginx:
        config = MountConfig(source=nginx.url("app.img"), mountpoint=str(tmp_path / "mnt"),
                             cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                             prefetch="sequential", bandwidth=1.0)  # one job, then debt
        with mounted(config) as mnt:
            incomplete = mnt / ".incfs" / "incomplete"

            def one_whole_file() -> bool:
                return len(os.listdir(incomplete)) == len(files) - 1

            from test_loader_util import wait_for

            wait_for(one_whole_file, 30, what="the first prefetch job to bring a whole file")
            assert status(mnt)["loader"]["crc_failures"] == 0
    assert_cache_clean(tmp_path / "cache.img")


def test_a_miss_near_the_end_of_a_file_takes_its_tail_in_the_same_request(tmp_path):
    """400 KiB: more than `amplify` (256 KiB), less than amplify + miss_tail.
    The first read's request brings the whole file: reading the rest asks
    the source for nothing more (before, its tail cost a second request).
    The metadata's answer brought the file's first blocks (incfs.loader.tail):
    the request starts at the first block it did not."""
    from test_loader_util import wait_for

    data = random.Random(7).randbytes(400 * 1024)
    with _big_file_mounted(tmp_path, data) as mnt:
        wait_for(lambda: status(mnt)["loader"]["first_answer"] == "stored", 30,
                 what="the first answer's blocks")
        # its one hash block and its first data blocks: read the first missing one
        first_missing = (status(mnt)["loader"]["first_answer_blocks"] - 1) * BLOCK_SIZE
        assert first_missing > 0
        with open(mnt / "big.bin", "rb") as f:
            f.seek(first_missing)
            assert f.read(BLOCK_SIZE) == data[first_missing:first_missing + BLOCK_SIZE]

        def first_job_done() -> bool:  # status is written when a job ends
            loader = status(mnt)["loader"]
            return loader["requests"] > 0 and loader["inflight_bytes"] == 0

        wait_for(first_job_done, 30, what="the first request to finish")
        requests = status(mnt)["loader"]["requests"]
        assert (mnt / "big.bin").read_bytes() == data
        assert status(mnt)["loader"]["requests"] == requests


def test_prefetch_yields_to_a_read_far_from_it_not_to_one_it_is_bringing(tmp_path):
    """A program reading where prefetch is fetching (the first file) does
    not stop it; one reading 30 MiB further on does (loader/core._note_far):
    prefetch starts nothing for `prefetch_yield` seconds, so that read does
    not share the link with four prefetch jobs."""
    files = {f"f{i:02d}.bin": random.Random(i).randbytes(MiB) for i in range(40)}
    with _prefetching_at_4mb_s(tmp_path, files) as mnt:  # ~10 s for all
        assert (mnt / "f00.bin").read_bytes() == files["f00.bin"]
        assert status(mnt)["loader"]["prefetch"]["yields"] == 0
        assert (mnt / "f39.bin").read_bytes() == files["f39.bin"]
        prefetch = status(mnt)["loader"]["prefetch"]
        assert prefetch["yields"] >= 1
        assert prefetch["width"] == 1  # narrow again after a far miss
        from test_loader_util import wait_for

        # and wider as its jobs end with no far miss meanwhile
        def widened() -> bool:
            return status(mnt)["loader"]["prefetch"]["width"] == DEFAULTS.prefetch_slots

        wait_for(widened, 30, what="prefetch to widen")
    assert_cache_clean(tmp_path / "cache.img")


@contextlib.contextmanager
def _mounted_behind_proxy(tmp_path, files: dict[str, bytes], prefetch: str, **proxy_options):
    """`files` packed and mounted lazily from a source behind a FaultProxy
    with `proxy_options` (its rate, its delay); yields the mount point."""
    from incfs.serve import RangeServer
    from incfs.testing.faultproxy import FaultProxy

    make_tree(tmp_path / "src", files)
    image = tmp_path / "app.img"
    pack(tmp_path / "src", image, compress="none")
    (tmp_path / "mnt").mkdir()
    with RangeServer(image) as server:
        host, port = server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        with FaultProxy((host, int(port)), **proxy_options) as proxy:
            config = MountConfig(source=proxy.url("/" + image.name),
                                 mountpoint=str(tmp_path / "mnt"),
                                 cache=str(tmp_path / "cache.img"), allow_unsigned=True,
                                 prefetch=prefetch, read_timeout=60)
            with mounted(config) as mnt:
                yield mnt


def _prefetching_at_4mb_s(tmp_path, files: dict[str, bytes]):
    """`files` mounted with sequential prefetch from a source that sends 4 MB/s."""
    return _mounted_behind_proxy(tmp_path, files, "sequential", rate_down=4_000_000)


def test_prefetch_yields_to_readahead_far_from_it(tmp_path):
    """A program streaming a file far from where prefetch is fetching: past
    its first MiB (misses) readahead brings it, and prefetch yields to those
    jobs too (each counts in `yields`), not only to the misses."""
    files = {f"f{i:02d}.bin": random.Random(i).randbytes(MiB) for i in range(24)}
    files["z-big.bin"] = random.Random(99).randbytes(6 * MiB)  # last in the source
    with _prefetching_at_4mb_s(tmp_path, files) as mnt:
        got = subprocess.run(["cat", str(mnt / "z-big.bin")], capture_output=True,
                             check=True).stdout
        assert got == files["z-big.bin"]
        loader = status(mnt)["loader"]
        assert loader["readahead_jobs"] >= 1
        assert loader["prefetch"]["yields"] > loader["pending_jobs"], loader
    assert_cache_clean(tmp_path / "cache.img")
