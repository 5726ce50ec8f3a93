"""The tree that an archive's entries build, with the rules for archives
that are not a plain listing of a tree:

* A later entry for a path replaces the earlier one ("later wins", as when
  tar extracts over what it extracted before). If both are directories the
  later one's metadata wins and the children stay; otherwise the earlier
  entry goes, with everything under it.
* A parent directory an archive never lists is made with mode 0755, owner
  0:0 and time 0.
* A hard link must name an earlier entry that is not a directory; it shares
  that inode (its own mode, owner and time are ignored, as tar does).
* A parent that exists but is not a directory is an error.

Layers (OCI) add whiteouts: `remove` a path, and `opaque` a directory,
which drops what lower layers put in it.

The tree is kept compact, for archives of millions of entries: a node is a
number, its fields are slots in parallel arrays, names are one bytearray,
children are found through a hash table of (parent, name) held in arrays,
and a plain entry is a 28-byte record. That is about 90 bytes a node where
a dict, a Node object and a name each were about 390.
"""

from __future__ import annotations

import dataclasses
import stat
import struct
from array import array
from typing import Callable, Protocol, runtime_checkable

from ..errors import UsageError
from .base import Entry, _show

ROOT = 0
_NONE = -1
# flags, one byte a node
DIR = 1  # a directory (never set on a hard link's name)
DEAD = 2  # this name was replaced or removed (its inode may live on as a link's)
WHOLE = 4  # the entry did not fit a record: it is in `Tree.whole`
LINKED = 8  # an inode that hard links also name
LINK = 16  # a hard link: the inode is `Tree.links[node]`

# mode, uid, gid, mtime_ns, and the size of a regular file or a device's rdev
_RECORD = struct.Struct("<IIIqQ")
_MIX = 0x9E3779B1  # spreads parent numbers over the hash table
_FIRST_TABLE = 1 << 12
_REHASH_SLICE = 1 << 16
_DIR_CACHE_LIMIT = 1 << 16
_KNOWN_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK)
_BLANK = bytes(_RECORD.size)
_IMPLIED = _RECORD.pack(stat.S_IFDIR | 0o755, 0, 0, 0, 0)

Problem = Callable[[Entry], "str | None"]


class Tree:
    """Nodes are numbers; the root is `ROOT`. A node is a name in a
    directory; a hard link's name is a node of its own whose inode
    (`inode`) is the node it links to."""

    def __init__(self, problem: Problem | None = None):
        # `problem` says why an entry cannot become an inode; such an entry
        # keeps its origin (pack names it in the error), others drop it
        self.problem = problem
        self.parent = array("i")
        self.name_at = array("q")
        self.name_len = array("H")
        self.names = bytearray()
        self.hashes = array("q")  # hash(name), to rehash without the names
        self.chain = array("i")  # the next node in the same hash bucket
        self.table = array("i", [_NONE]) * _FIRST_TABLE
        self.first = array("i")  # a directory's newest child
        self.sibling = array("i")  # the next older child of the same directory
        self.flags = bytearray()
        self.key = array("q")  # the input's or packer's handle on the content; -1
        self.layer = array("i")  # which layer put it here (OCI)
        self.records = bytearray()
        self.whole: dict[int, Entry] = {}
        self.links: dict[int, int] = {}
        self.dirs: dict[bytes, int] = {}  # path -> directory node: most parents are found here
        self._new(_NONE, b"", 0, DIR, _IMPLIED)

    def __len__(self) -> int:
        return len(self.flags)

    # --- building ---------------------------------------------------------------

    def add(self, e: Entry, layer: int = 0) -> tuple[int, bool]:
        """Put `e` in the tree; returns its node (a hard link's: the inode it
        names) and whether the node is new."""
        if not e.path:
            if not e.is_dir or e.link is not None:
                raise UsageError(f"{e.origin}: the archive's root is not a directory")
            self._store(ROOT, e)
            self.layer[ROOT] = layer
            return ROOT, False
        up, _, name = e.path.rpartition(b"/")
        parent = self._dir(up, layer, e.origin)
        existing = self.child(parent, name)
        if e.link is not None:
            return self._link(e, parent, name, existing, layer), False
        if existing >= 0 and self.flags[existing] & (DIR | LINK) == DIR and e.is_dir:
            self._store(existing, e)
            self.layer[existing] = layer
            return existing, False
        if existing >= 0:
            self._kill(existing)
        return self._new(parent, name, layer, DIR if e.is_dir else 0, e), True

    def _link(self, e: Entry, parent: int, name: bytes, existing: int, layer: int) -> int:
        target = self.lookup(e.link)
        if target < 0:
            raise UsageError(f"{e.origin}: hard link to {_show(e.link)}, which is not "
                             "an earlier entry of the archive")
        if self.flags[target] & DIR:
            raise UsageError(f"{e.origin}: hard link to a directory")
        if existing >= 0:
            self._kill(existing)
        node = self._new(parent, name, layer, LINK, _BLANK)
        self.links[node] = target
        self.flags[target] |= LINKED
        return target

    def _dir(self, path: bytes, layer: int, origin: str) -> int:
        """The directory at `path`, made (implied) where missing."""
        node = self.dirs.get(path)
        if node is not None:
            return node
        # up to the nearest directory already known, then down making what is missing
        missing = []
        up, node = path, ROOT
        while up:
            known = self.dirs.get(up)
            if known is not None:
                node = known
                break
            up, _, name = up.rpartition(b"/")
            missing.append(name)
        for name in reversed(missing):
            up = up + b"/" + name if up else name
            child = self.child(node, name)
            if child < 0:
                child = self._new(node, name, layer, DIR, _IMPLIED)
            elif self.flags[child] & (DIR | LINK) != DIR:
                raise UsageError(f"{origin}: {_show(up)} is not a directory")
            if len(self.dirs) >= _DIR_CACHE_LIMIT:
                self.dirs.clear()
            self.dirs[up] = node = child
        return node

    def _new(self, parent: int, name: bytes, layer: int, flags: int,
             e: Entry | bytes) -> int:
        """A new node; `e` is its entry, or already its record."""
        node = len(self.flags)
        self.parent.append(parent)
        self.name_at.append(len(self.names))
        self.name_len.append(len(name))
        self.names += name
        h = hash(name)
        self.hashes.append(h)
        self.first.append(_NONE)
        self.flags.append(flags)
        self.key.append(_NONE)
        self.layer.append(layer)
        if isinstance(e, Entry):
            record = _record(e)
            if record is None:
                self._keep_whole(node, e)
                record = _BLANK
            e = record
        self.records += e
        if parent == _NONE:  # the root: in no directory
            self.chain.append(_NONE)
            self.sibling.append(_NONE)
            return node
        bucket = (h + parent * _MIX) & (len(self.table) - 1)
        self.chain.append(self.table[bucket])
        self.table[bucket] = node
        self.sibling.append(self.first[parent])
        self.first[parent] = node
        if node >= len(self.table):
            self._rehash(4 * len(self.table))
        return node

    def _store(self, node: int, e: Entry) -> None:
        """`e` replaces the entry of `node` (a directory listed again)."""
        record = _record(e)
        if record is None:
            self._keep_whole(node, e)
            return
        at = node * _RECORD.size
        self.records[at:at + _RECORD.size] = record
        self.flags[node] &= ~WHOLE
        self.whole.pop(node, None)

    def _keep_whole(self, node: int, e: Entry) -> None:
        keep_origin = self.problem is None or self.problem(e) is not None
        self.whole[node] = dataclasses.replace(e, path=b"", data=None,
                                               origin=e.origin if keep_origin else "")
        self.flags[node] |= WHOLE

    def _rehash(self, size: int) -> None:
        mask = size - 1
        self.table = table = array("i", [_NONE]) * size
        chain, flags, hashes, parent = self.chain, self.flags, self.hashes, self.parent
        # buckets a slice at a time: a list of them all would be ~36 bytes a node
        for start in range(1, len(flags), _REHASH_SLICE):
            end = min(start + _REHASH_SLICE, len(flags))
            buckets = [(h + p * _MIX) & mask
                       for h, p in zip(hashes[start:end], parent[start:end])]
            for node, bucket in enumerate(buckets, start):
                if not flags[node] & DEAD:
                    chain[node] = table[bucket]
                    table[bucket] = node

    def _kill(self, node: int) -> None:
        """Take the name `node` out of the tree (its inode stays if a link names it)."""
        self.flags[node] |= DEAD
        bucket = (self.hashes[node] + self.parent[node] * _MIX) & (len(self.table) - 1)
        cur = self.table[bucket]
        if cur == node:
            self.table[bucket] = self.chain[node]
        else:
            while self.chain[cur] != node:
                cur = self.chain[cur]
            self.chain[cur] = self.chain[node]
        if self.flags[node] & DIR:
            self.dirs.clear()  # paths under it may be cached

    # --- layers -------------------------------------------------------------------

    def remove(self, path: bytes, below_layer: int) -> bool:
        """Remove `path` if a layer below `below_layer` put it there."""
        up, _, name = path.rpartition(b"/")
        parent = self.lookup(up)
        if parent < 0 or not self.flags[parent] & DIR:
            return False
        node = self.child(parent, name)
        if node < 0 or self.layer[node] >= below_layer:
            return False
        self._kill(node)
        return True

    def opaque(self, path: bytes, layer: int) -> None:
        """Drop everything lower layers put under directory `path`; what
        this layer put there stays (its own subdirectories are pruned the
        same way)."""
        node = self.lookup(path)
        if node < 0 or not self.flags[node] & DIR:
            return
        stack = [node]
        while stack:
            for child in self._live(stack.pop()):
                if self.layer[child] < layer:
                    self._kill(child)
                elif self.flags[child] & DIR:
                    stack.append(child)

    # --- reading ----------------------------------------------------------------------

    def child(self, parent: int, name: bytes) -> int:
        """The node named `name` in directory `parent`, or -1."""
        h = hash(name)
        node = self.table[(h + parent * _MIX) & (len(self.table) - 1)]
        while node >= 0:
            if self.hashes[node] == h and self.parent[node] == parent and self.name(node) == name:
                return node
            node = self.chain[node]
        return _NONE

    def lookup(self, path: bytes) -> int:
        """The inode at `path` (a hard link's target), or -1."""
        node = ROOT
        for part in path.split(b"/") if path else ():
            if not self.flags[node] & DIR:
                return _NONE
            node = self.child(node, part)
            if node < 0:
                return _NONE
            node = self.inode(node)
        return node

    def name(self, node: int) -> bytes:
        at = self.name_at[node]
        return bytes(self.names[at:at + self.name_len[node]])

    def inode(self, node: int) -> int:
        return self.links[node] if self.flags[node] & LINK else node

    def is_dir(self, node: int) -> bool:
        return bool(self.flags[node] & DIR)

    def is_linked(self, node: int) -> bool:
        return bool(self.flags[node] & LINKED)

    def entry(self, node: int) -> Entry:
        """The entry that made inode `node` (path and, unless it has a
        problem, origin left out)."""
        if self.flags[node] & WHOLE:
            return self.whole[node]
        mode, uid, gid, mtime_ns, extra = _RECORD.unpack_from(self.records, node * _RECORD.size)
        if stat.S_ISREG(mode):
            return Entry(b"", mode, uid, gid, mtime_ns, size=extra)
        return Entry(b"", mode, uid, gid, mtime_ns, rdev=extra)

    def children(self, node: int) -> list[tuple[bytes, int]]:
        """(name, node) of directory `node`'s children, names in byte order."""
        out = [(self.name(child), child) for child in self._live(node)]
        out.sort()
        return out

    def _live(self, node: int) -> list[int]:
        out = []
        child = self.first[node]
        while child >= 0:
            if not self.flags[child] & DEAD:
                out.append(child)
            child = self.sibling[child]
        return out

    def files(self) -> array:
        """Inodes of the tree's regular files that have a key, in node
        order (the order they were added in)."""
        reached = bytearray(len(self.flags))
        stack = [ROOT]
        while stack:
            for child in self._live(stack.pop()):
                node = self.inode(child)
                reached[node] = 1
                if self.flags[node] & DIR:
                    stack.append(node)
        return array("i", (node for node in range(len(reached))
                           if reached[node] and self.key[node] >= 0))


def _record(e: Entry) -> bytes | None:
    """A plain entry as a record; None for one that needs more (a symlink's
    target, extended attributes, metadata, a file id, or numbers out of the
    record's range)."""
    if e.target or e.xattrs or e.metadata or e.file_id is not None or e.link is not None:
        return None
    fmt = stat.S_IFMT(e.mode)
    if fmt not in _KNOWN_TYPES:
        return None
    extra = e.size if fmt == stat.S_IFREG else e.rdev
    if (fmt == stat.S_IFREG and e.rdev) or (fmt != stat.S_IFREG and e.size):
        return None
    try:
        return _RECORD.pack(e.mode, e.uid, e.gid, e.mtime_ns, extra)
    except struct.error:
        return None


@runtime_checkable
class TreeInput(Protocol):
    """An input that builds the tree itself (OCI: layers merged, whiteouts
    applied) and hands pack the data of only the files that survive:
    `pack_file(entry)` stores one and returns its file number, which goes in
    the file's `tree.key`."""

    notes: list[str]

    def build(self, tree: Tree, pack_file: Callable[[Entry], int]) -> None: ...

    def close(self) -> None: ...
