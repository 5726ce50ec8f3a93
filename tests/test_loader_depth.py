"""Pipeline depth following the link (issue 10): link.LinkEstimate from
request timings (a fake clock: the arithmetic, no real time), Slots keeping
background bytes on the wire within the depth while reads pass, and the
readahead of a file read whole from its start."""

from __future__ import annotations

import trio
import trio.testing

from incfs import BLOCK_SIZE
from incfs.loader.link import LinkEstimate
from incfs.loader.schedule import PREFETCH, READ, READAHEAD, Readahead, Slots

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rtt_is_the_median_small_request_and_bandwidth_counts_busy_time_only():
    clock = Clock()
    link = LinkEstimate(clock)
    assert link.rtt is None and link.bandwidth is None
    assert link.depth(floor=2 * MiB, ceiling=64 * MiB) == 2 * MiB  # nothing measured yet
    for seconds in (0.030, 0.020, 0.025):  # three 4 KiB requests, one at a time
        link.started()
        clock.now += seconds
        link.finished(4096, seconds)
    assert link.rtt == 0.025
    clock.now += 50.0  # idle: neither counted as busy nor as slow
    link.started()
    link.started()
    clock.now += 0.1
    link.finished(5 * MiB, 0.1)  # big requests are no RTT sample
    clock.now += 0.1
    link.finished(5 * MiB, 0.2)
    assert link.rtt == 0.025
    assert 45 * MiB < link.bandwidth < 55 * MiB  # ~10 MiB in 0.2 busy seconds
    depth = link.depth(floor=1 * MiB, ceiling=64 * MiB)
    assert abs(depth - 2 * link.bandwidth * 0.025) < 1  # 2 x bandwidth x RTT
    assert link.depth(floor=1 * MiB, ceiling=1536 * 1024) == 1536 * 1024
    assert link.active == 0


def test_a_failed_request_leaves_no_sample():
    clock = Clock()
    link = LinkEstimate(clock)
    link.started()
    clock.now += 5.0
    link.finished(0, 0.0)  # what the loader reports for a request that failed
    assert link.rtt is None and link.active == 0


def test_background_bytes_on_the_wire_stay_within_the_depth_and_reads_pass():
    started: list[str] = []

    async def main():
        slots = Slots(total=16, prefetch_max=16, budget=64 * MiB, depth=lambda: 2 * MiB)
        first = await slots.acquire(READAHEAD, nbytes=MiB)
        second = await slots.acquire(PREFETCH, nbytes=MiB)

        async def take(level: int, name: str) -> None:
            got = await slots.acquire(level, nbytes=MiB)
            started.append(name)
            slots.release_slot(got, MiB)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, READAHEAD, "readahead")
            await trio.testing.wait_all_tasks_blocked()
            assert started == []  # 3 MiB > the 2 MiB depth: waits
            nursery.start_soon(take, READ, "read")
            await trio.testing.wait_all_tasks_blocked()
            assert started == ["read"]  # reads are never held back by the depth
            slots.release_slot(first, MiB)
        assert started == ["read", "readahead"]
        slots.release_slot(second, MiB)
        assert slots.wire == [0, 0, 0]
        big = await slots.acquire(READAHEAD, nbytes=8 * MiB)  # alone: always admitted
        slots.release_slot(big, 8 * MiB)

    trio.run(main)


def test_the_bytes_of_an_answer_leave_the_wire_as_they_come_in():
    """The depth counts what is asked for and not in yet (Slots.landed): a
    request waiting behind a 2 MiB one starts once enough of that one's
    answer is in, not at its end; a retry that starts the body again puts
    its bytes back."""
    started: list[str] = []

    async def main():
        slots = Slots(total=16, prefetch_max=16, budget=64 * MiB, depth=lambda: 2 * MiB)
        first = await slots.acquire(READAHEAD, nbytes=2 * MiB)

        async def take() -> None:
            got = await slots.acquire(READAHEAD, nbytes=MiB)
            started.append("next")
            slots.release_slot(got, MiB)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            slots.landed(first, MiB // 2)
            await trio.testing.wait_all_tasks_blocked()
            assert started == []  # 1.5 MiB + 1 MiB still more than the depth
            slots.landed(first, MiB // 2)
            await trio.testing.wait_all_tasks_blocked()
            assert started == ["next"]
        slots.landed(first, -MiB)  # a retry: the body again from its start
        assert slots.wire[READAHEAD] == 2 * MiB
        slots.release_slot(first, 2 * MiB)
        assert slots.wire == [0, 0, 0]

    trio.run(main)


def test_jobs_launched_together_get_their_slots_in_source_order():
    """Three jobs enqueued at launch, their tasks run in the opposite order:
    the slots go nearest first (Slots.enqueue), each job leaving the queue
    at its first slot; a job ending without one leaves it too."""
    got: list[int] = []

    async def main():
        slots = Slots(total=16, prefetch_max=16, budget=64 * MiB, depth=lambda: MiB)
        for order in (300, 100, 200, 50):
            slots.enqueue(READAHEAD, order)
        slots.dequeue(READAHEAD, 50)  # ended with nothing to fetch

        async def job(order: int) -> None:
            level = await slots.acquire(READAHEAD, nbytes=MiB, order=order)
            slots.dequeue(READAHEAD, order)
            got.append(order)
            await trio.sleep(0.01)
            slots.release_slot(level, MiB)

        async with trio.open_nursery() as nursery:
            for order in (300, 200, 100):
                nursery.start_soon(job, order)
                await trio.testing.wait_all_tasks_blocked()
        assert slots.drained(READAHEAD, 1)

    trio.run(main)
    assert got == [100, 200, 300]


def test_a_file_read_whole_from_its_start_gets_its_window_with_the_first_read():
    launched: list[tuple[int, int, int]] = []
    ra = Readahead(start=256 * 1024, maximum=16 * MiB, launch=lambda *a: launched.append(a),
                   after=MiB, cap=lambda: 4 * MiB)
    blocks = MiB // BLOCK_SIZE
    ra.note_read(7, 0, blocks - 1)  # one 1 MiB read at offset 0
    assert launched == [(7, blocks, blocks)]  # the next 1 MiB, at once
    ra.note_read(8, 0, 31)  # a 128 KiB read: not yet a sign of a whole-file reader
    ra.note_read(9, 10, blocks + 10)  # a long read elsewhere: neither
    assert launched == [(7, blocks, blocks)]
    for first in range(blocks, 64 * blocks, blocks):
        ra.note_read(7, first, first + blocks - 1)
    assert max(count for ino, _, count in launched if ino == 7) == 4 * MiB // BLOCK_SIZE
    assert ra.maximum == 4 * MiB  # the link's cap, under `maximum`


def test_long_reads_arriving_out_of_order_keep_the_stream_sequential():
    """The kernel sends a file's 1 MiB readahead reads several at once; one
    that arrives after the read behind it is late, not a jump."""
    launched: list[tuple[int, int, int]] = []
    ra = Readahead(start=256 * 1024, maximum=16 * MiB, launch=lambda *a: launched.append(a),
                   after=MiB)
    blocks = MiB // BLOCK_SIZE
    for k in range(0, 8, 2):  # reads 1, 0, 3, 2, ... in pairs
        ra.note_read(3, (k + 1) * blocks, (k + 2) * blocks - 1)
        ra.note_read(3, k * blocks, (k + 1) * blocks - 1)
    assert ra.streams[3].sequential
    assert ra.streams[3].window > 256 * 1024  # grew, never reset
