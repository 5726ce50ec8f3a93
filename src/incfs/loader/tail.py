"""The blocks that came with a new cache's metadata.

A new cache's first request asks for the image's first `first_read` bytes
(64 KiB) and is answered before anything else is known; a small image's
metadata ends well inside them (a 1 GiB image of 100 files: at 28 KiB).
What follows it there is what `pack` lays first in the data region: the
hash trees, the first files' first. Those bytes are on the wire anyway (the
server sent the whole range), and a first read of such a file needs them:
thrown away, they cost the read a request of their own, which shares the
link with its data and came in ~5 ms after it at 20 ms / 100 Mbit/s.

So the early reader keeps the connection once the metadata is in
(`EarlyReader.read_prefix(keep_rest=True)`), and the loader reads the
answer on to its end when it starts (`TailMixin._store_first_rest`); the
blocks lying wholly in it are stored as any fetched block is: checked
against the file's tree from the signed root down, hash blocks top level
first. The connection then goes back to the pool for the first read. A
rest that does not come whole (a stall, a reset) is dropped: nothing of it
is used, and the blocks are fetched when wanted, as before.

Nothing is claimed before the bytes are in: a read that comes first asks
for its blocks itself, and the rest's copies of them are left unused.
"""

from __future__ import annotations

from collections.abc import Callable

from .plan import DATA, HASH, Job, Key, Want, want_at


def wants_in(image, busy: Callable[[Key], bool], start: int,
             end: int) -> dict[int, list[Want]]:
    """Per file, the blocks whose stored bytes lie wholly in [start, end) of
    the source, absent and not claimed (`busy`). Only maps that lay their
    blocks back to back are looked at, from their first block on while it
    lies before `end` (`laid_out`: two map heads per file, not the maps); a
    map listing every offset is skipped (decoding a big one costs more than
    the few KiB could save)."""
    maps = image.source_maps
    laid_out = getattr(maps, "laid_out", None)
    if laid_out is None:
        return {}
    found: dict[int, list[Want]] = {}
    for ino in maps:
        spans = laid_out(ino)
        near = [tree for tree in (HASH, DATA)  # hash blocks first: the data are checked with them
                if spans is not None and spans[tree] is not None and spans[tree][1]
                and spans[tree][0] < end]
        if not near:
            continue  # (most files: nothing decoded, no inode made)
        node = image.ns.inodes.get(ino)
        if node is None or node.data is None:
            continue
        file_maps = maps[ino]
        for tree in near:
            span = spans[tree]
            target = node.hashes if tree == HASH else node.data
            if target is None:
                continue
            smap = file_maps[0 if tree == DATA else 1]
            for index in range(span[1]):
                want = want_at(smap, tree, index)
                if want is None or want.offset >= end:
                    break
                if (want.size and start <= want.offset and want.offset + want.size <= end
                        and not target.is_present(index) and not busy((ino, tree, index))):
                    found.setdefault(ino, []).append(want)
    return found


class TailMixin:
    """The loader's storing of the first answer's rest. Mixed into Loader,
    which provides info, image, inflight, stats, `_claim`, `_store`,
    `_release` and `_update_status`."""

    # what became of the first answer's rest: "none" (no early answer, or
    # no rest: the metadata filled it), "waiting" (to be read), "stored"
    # (its blocks are stored, or were present), "dropped" (it did not come whole)
    first_answer = "none"

    def _keep_first_rest(self) -> None:
        """At the loader's creation: take the reader open_cache left."""
        self._first_rest = self.info.pop("first_rest", None)
        getattr(self.image, "cache_info", {}).pop("first_rest", None)
        if self._first_rest is not None:
            self.first_answer = "waiting"

    def _drop_first_rest(self) -> None:
        """At the loader's end: close a connection kept for a rest never read."""
        if self._first_rest is not None:
            self._first_rest.drop_rest()
            self._first_rest = None

    async def _store_first_rest(self) -> None:
        """Read the first answer on to its end and store the blocks in it
        (see the module's docstring)."""
        reader, self._first_rest = self._first_rest, None
        if reader is None:
            return
        # after READY: the mount's first steps (INIT, the hand-over to the
        # supervisor) would wait behind the fill's thread hops
        await self.service.ready.wait()
        body = await reader.read_rest()
        if body is None:
            self.first_answer = "dropped"
            self._update_status()
            return
        found = wants_in(self.image, self.inflight.__contains__, 0, len(body))
        for ino, wants in found.items():
            # the blocks' bytes count as transferred, as a request's would
            # (the metadata's count as metadata_bytes, the padding nowhere)
            self.stats["bytes_transferred"] += sum(w.size for w in wants)
            job = Job(ino, wants, prefetch=True)
            self._claim(job, wants)
            items = [(w, body[w.offset:w.offset + w.size], None) for w in wants]
            try:
                failed = await self._store(self.image.ns.inodes[ino], job, items)
            finally:
                self._release(job, list(job.keys))
            self.stats["first_answer_blocks"] += len(wants) - len(failed)
        self.first_answer = "stored"
        self._update_status()
