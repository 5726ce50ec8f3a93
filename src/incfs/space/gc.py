"""Dead space in an image, given back by punching holes: the data of files
that no name reaches any more (offline only: a mount may still have them
open) and payload no block map names (superseded BLOCKS/DATA: a block
mapped twice, a repaired block's old bytes, a release whose punch a crash
cut short).

Live bytes are computed from the maps as replayed, across every file, so
bytes shared by two blocks (pack deduplicates) stay while either is live.
Metadata records are never punched: they are the log's chain (only
`incfs compact` drops them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import ROOT_INO
from ..format.layout import LOG_START, RECORD_HEADER_SIZE, RecordHeader, RecordType
from ..format.records import BlockKind, info_kind, info_size
from . import punch as holes
from .plainfiles import is_plain
from .records import ReleasedRun, Where, encode_released
from .release import mark, punch_ranges


@dataclass
class GcResult:
    allocated_before: int = 0
    allocated_after: int = 0
    unlinked_files: int = 0
    blocks_released: int = 0
    dead_bytes: int = 0  # payload no map names (punched, whole pages only)

    @property
    def reclaimed(self) -> int:
        return max(0, self.allocated_before - self.allocated_after)


def collect(image, *, unlinked: bool) -> GcResult:
    """Run gc on a writable image (the caller holds its writer lock).
    `unlinked`: also release the data of files without a name (offline)."""
    result = GcResult(allocated_before=holes.allocated(image.fd))
    # Dead means dead by records on disk: a refill not yet synced must not
    # make its predecessor's bytes punchable (a power cut could lose it).
    image.appender.sync()
    if unlinked:
        release_unlinked(image, result)
    dead = dead_ranges(data_payloads(image.fd, image.appender.end), live_ranges(image))
    result.dead_bytes = sum(n for _o, n in dead)
    punch_ranges(image.fd, dead)
    result.allocated_after = holes.allocated(image.fd)
    return result


def release_unlinked(image, result: GcResult) -> None:
    """One RELEASED record for the data of every nameless file, made durable
    before the punch (a crash in between leaves the blocks where they were)."""
    runs = [ReleasedRun(n.ino, 0, n.data.count, Where.GONE) for n in image.ns.inodes.values()
            if n.ino != ROOT_INO and n.nlink == 0 and n.data is not None and n.data.present]
    if not runs:
        return
    image.appender.append(RecordType.RELEASED, encode_released(runs))
    image.appender.sync()
    for run in runs:
        result.blocks_released += mark(image, image.ns.inodes[run.ino], run)
    result.unlinked_files = len(runs)


def data_payloads(fd: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of every DATA payload in the log [LOG_START, end),
    walked header by header (the image was checked when it was opened)."""
    out, offset = [], LOG_START
    while offset < end:
        header = RecordHeader.decode(os.pread(fd, RECORD_HEADER_SIZE, offset))
        if header is None:
            break
        if header.type == RecordType.DATA:
            out.append((offset + RECORD_HEADER_SIZE, header.length - RECORD_HEADER_SIZE))
        offset += header.length
    return out


def live_ranges(image) -> list[tuple[int, int]]:
    """Bytes in the image that some present block (data or hash) is stored in."""
    out = []
    for node in image.ns.inodes.values():
        for bmap in (node.data, node.hashes):
            if bmap is None:
                continue
            for _i, offset, info, _crc in bmap.entries():
                if info_kind(info) is not BlockKind.ZERO and not is_plain(offset):
                    out.append((offset, info_size(info)))
    return holes.merge(out)


def dead_ranges(payloads: list[tuple[int, int]], live: list[tuple[int, int]]
                ) -> list[tuple[int, int]]:
    """The parts of the payloads that no live range covers (both sorted)."""
    dead, k = [], 0
    for start, length in sorted(payloads):
        pos, end = start, start + length
        while k < len(live) and live[k][0] + live[k][1] <= pos:
            k += 1
        j = k
        while pos < end:
            if j >= len(live) or live[j][0] >= end:
                dead.append((pos, end - pos))
                break
            if live[j][0] > pos:
                dead.append((pos, live[j][0] - pos))
            pos = max(pos, live[j][0] + live[j][1])
            j += 1
    return dead
