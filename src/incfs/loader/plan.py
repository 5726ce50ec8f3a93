"""What a read needs: blocks to fetch, their hash blocks, and the byte
ranges that cover them in the source.

Pure planning over an image's source maps: nothing here does I/O or waits,
so it can be tested on images alone. `Planner.plan` claims nothing itself;
the loader claims the returned wants (see `Loader._claim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import BLOCK_SIZE
from ..format.records import BlockKind, TreeKind, info_kind, info_size
from ..image import Image
from ..integrity import merkle

DATA = int(TreeKind.DATA)
HASH = int(TreeKind.HASH)
Key = tuple[int, int, int]  # (ino, tree, index), as in waits


@dataclass(slots=True)
class Want:
    """One block to get: where its stored bytes are in the source."""

    tree: int
    index: int
    offset: int
    size: int  # stored bytes; 0 for an all-zero block (nothing to fetch)
    kind: BlockKind
    crc: int | None  # None: the source's map has no CRCs (the hash tree checks)
    # a leaf hash block the job builds from the data under it, all of which
    # it fetches (Image.fill checks it), instead of fetching it; fetched
    # after all when the built one fails its check
    derived: bool = False


@dataclass(slots=True)
class Range:
    offset: int
    length: int
    wants: list[Want] = field(default_factory=list)


class Job:
    """Blocks of one file fetched and stored together (a state object: equal
    only to itself)."""

    def __init__(self, ino: int, wants: list[Want], prefetch: bool, *,
                 readahead: bool = False) -> None:
        self.ino, self.wants = ino, wants
        self.prefetch = prefetch  # low priority; becomes False when a read starts waiting for it
        self.keys: set[Key] = set()  # claimed (in flight), not yet released
        self.background = False  # counted in Loader.prefetch_running
        self.readahead = readahead  # ahead of a sequential reader (schedule.READAHEAD)
        self.held = 0  # bytes of in-flight budget held until what was fetched is stored
        self.far = False  # a read's miss away from prefetch: it yields while this runs
        self.far_mark = 0  # prefetch jobs: the loader's far-miss count when it started
        self.unbuilt: list[Want] = []  # built leaves that failed: fetch them
        # (class, source offset) in the slots' queue until its first slot
        # (JobRunner._queue_job): jobs launched together start in source order
        self.queued: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.size for w in self.wants if not w.derived)

    def leaves(self) -> set[int]:
        """Leaf hash blocks this job means to build from its data."""
        return {w.index for w in self.wants if w.derived}


def plan_ranges(wants: list[Want], max_len: int, max_gap: int) -> list[Range]:
    """Cover the stored bytes of `wants` with few ranges: blocks are taken in
    source order and joined while the gap between them is at most `max_gap`
    bytes and the range stays within `max_len` bytes (a single block longer
    than that still gets its own range). Zero blocks and leaves the job
    builds need no bytes."""
    out: list[Range] = []
    for w in sorted((w for w in wants if w.size and not w.derived), key=lambda w: w.offset):
        if out:
            last = out[-1]
            end = last.offset + last.length
            new_end = max(end, w.offset + w.size)
            if w.offset - end <= max_gap and new_end - last.offset <= max_len:
                last.length = new_end - last.offset
                last.wants.append(w)
                continue
        out.append(Range(w.offset, w.size, [w]))
    return out


def want_at(smap, tree: int, index: int) -> Want | None:
    """The Want of block `index` of a source map (None when it has none)."""
    loc = smap.get(index)
    if loc is None:
        return None
    offset, info, crc = loc
    kind = info_kind(info)
    return Want(tree, index, offset, 0 if kind is BlockKind.ZERO else info_size(info), kind, crc)


class Planner:
    """Chooses the blocks to fetch for blocks a read (or prefetch) names.

    `busy(key)` says whether a block is already claimed by a request, so two
    requests never fetch the same block."""

    def __init__(self, image: Image, busy: Callable[[Key], bool]):
        self.image = image
        self.busy = busy

    def plan(self, ino: int, data_idx: Iterable[int], hash_idx: Iterable[int],
             extend: int = 0, derive: bool = False) -> list[Want]:
        """Wants for blocks `data_idx`/`hash_idx` of a file: those absent and
        not claimed, their absent neighbours that follow them in the source
        up to `extend` bytes of range, and the hash blocks that verify them.
        `derive`: leaf hash blocks whose data all come in this job are built
        from it, not fetched (Want.derived). Only for jobs nobody waits on
        yet: their data can be stored only once the whole group is in."""
        node = self.image.ns.inodes.get(ino)
        maps = self.image.source_maps.get(ino)
        if node is None or node.data is None or maps is None:
            return []
        take = self._taker(node, maps)
        selected = self._data(node, take, sorted(set(data_idx)), extend)
        hashes: dict[int, Want] = {}
        for s in set(hash_idx):
            w = take(HASH, s)
            if w is not None:
                hashes[s] = w
        for s in self._tree_needs(node, selected):
            if s not in hashes:
                w = take(HASH, s)
                if w is not None:
                    w.derived = derive and _covers_leaf(node, s, selected)
                    hashes[s] = w
        return list(hashes.values()) + list(selected.values())

    def _taker(self, node, maps) -> Callable[[int, int], Want | None]:
        dmap, hmap = maps

        def take(tree: int, i: int) -> Want | None:
            target, smap = (node.data, dmap) if tree == DATA else (node.hashes, hmap)
            if target is None or smap is None or not 0 <= i < target.count:
                return None
            if target.is_present(i) or self.busy((node.ino, tree, i)):
                return None
            return want_at(smap, tree, i)
        return take

    def _data(self, node, take, mandatory: list[int], extend: int) -> dict[int, Want]:
        """The mandatory data blocks and, per run of them, the neighbours
        after the run that lie right after it in the source (so one range
        covers them) while the run stays within `extend` bytes."""
        must = set(mandatory)
        selected: dict[int, Want] = {}
        group_start = last_end = None
        last_index = -2
        for i in mandatory:
            if i in selected:
                continue
            w = take(DATA, i)
            if w is None:
                continue
            if last_index != i - 1:
                group_start = last_end = None
            if w.size:
                if last_end is not None and not last_end <= w.offset <= last_end + BLOCK_SIZE:
                    group_start = None
                if group_start is None:
                    group_start = w.offset
                last_end = w.offset + w.size
            selected[i] = w
            last_index = i
            if not extend or i + 1 in must:
                continue
            j, added = i + 1, 0
            while j < node.data.count and added < extend // 512:
                w2 = take(DATA, j)
                if w2 is None:
                    break
                if w2.size:
                    if group_start is None:
                        group_start = last_end = w2.offset
                    if not last_end <= w2.offset <= last_end + BLOCK_SIZE:
                        break
                    if w2.offset + w2.size - group_start > extend:
                        break
                    last_end = w2.offset + w2.size
                selected[j] = w2
                last_index = j
                j += 1
                added += 1
        return selected

    def _tree_needs(self, node, selected: dict[int, Want]) -> list[int]:
        """Hash blocks (storage indexes) that verify the selected data."""
        if not (node.has_tree and node.hashes is not None
                and node.hashes.present < node.hashes.count):
            return []
        need: list[int] = []
        for rep in sorted({i // merkle.HASHES_PER_BLOCK for i in selected}):
            need.extend(merkle.required_hash_blocks(node.geometry,
                                                    rep * merkle.HASHES_PER_BLOCK))
        return need

    def missing_deps(self, node, data_indexes: list[int]) -> list[Want]:
        """Hash blocks that data blocks need, absent and claimed nowhere."""
        if not node.has_tree or node.hashes is None:
            return []
        maps = self.image.source_maps.get(node.ino)
        if maps is None or maps[1] is None:
            return []
        need: set[int] = set()
        for i in data_indexes:
            need.update(merkle.required_hash_blocks(node.geometry, i))
        out = []
        for s in sorted(need):
            if node.hashes.is_present(s) or self.busy((node.ino, HASH, s)):
                continue
            w = want_at(maps[1], HASH, s)
            if w is not None:
                out.append(w)
        return out


def _under_leaf(node, storage_index: int) -> range | None:
    """The data blocks under a hash block, if it is a leaf."""
    geo = node.geometry
    return geo.leaf_group(storage_index) if geo.level_of(storage_index)[0] == 0 else None


def _covers_leaf(node, storage_index: int, selected: dict[int, Want]) -> bool:
    """Whether a hash block is a leaf whose every data block is in `selected`."""
    under = _under_leaf(node, storage_index)
    return under is not None and all(i in selected for i in under)


def leaf_within(node, storage_index: int, first: int, stop: int) -> bool:
    """Whether a hash block is a leaf whose data all lie in [first, stop)."""
    under = _under_leaf(node, storage_index)
    return under is not None and first <= under.start and under.stop <= stop


def aligned_slices(first: int, stop: int, step: int):
    """[first, stop) cut into (start, end) pieces at multiples of `step`
    (a multiple of 128: a leaf hash block's data never spans two pieces)."""
    start = first
    while start < stop:
        end = min(stop, (start // step + 1) * step)
        yield start, end
        start = end


def parents_needed(node, tree: int, indexes: Iterable[int]) -> set[int]:
    """Hash blocks (storage indexes) that blocks of `tree` are verified with:
    for data blocks the hash blocks of their leaf group, for hash blocks
    their ancestors."""
    if not node.has_tree or node.hashes is None:
        return set()
    geo = node.geometry
    need: set[int] = set()
    if tree == DATA:
        for rep in {i // merkle.HASHES_PER_BLOCK for i in indexes}:
            need.update(merkle.required_hash_blocks(geo, rep * merkle.HASHES_PER_BLOCK))
        return need
    for s in indexes:
        level, index = geo.level_of(s)
        while level + 1 < geo.levels:
            parent, _ = geo.locate(level, index)
            need.add(parent)
            level, index = level + 1, index // merkle.HASHES_PER_BLOCK
    return need
