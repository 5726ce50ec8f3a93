"""A namespace served from an image's index, with the log's later records
layered over it (the overlay).

Inodes are built from their index records when first asked for and kept in a
weak cache plus a short list of recent ones, so memory follows what is in use,
not the number of files. An inode that changes (a name added under it, a block
filled, a record from the log) is pinned: kept for good, because the index no
longer describes it. The rules of `Namespace` (checks, links, walking) apply
unchanged: this class only changes where the inodes come from.

Checks happen on first access (a directory's names once, each inode's record
every time it is built): an inconsistency raises IndexDamage, an EIO for the
access that met it.
"""

from __future__ import annotations

import stat
import threading
import weakref
from collections import OrderedDict
from array import array
from typing import Callable, Iterator

from . import BLOCK_SIZE, block_dirents
from .blockmap import ABSENT, BlockMap, loaded_map
from .format.index import FLAG_POSIX, IndexReader, InodeRecord, NameBlock, Span, damage
from .format.layout import LOG_START
from .format.records import BlockKind, file_type
from .integrity.merkle import block_count
from .namespace import Inode, Namespace, check_name

RECENT = 4096  # inodes kept strongly besides those in use and the pinned
# subdirectories from which their records are asked for at once before the
# parent check reads them (fewer: each fault's own read-around does as well)
PREFETCH_FROM = 16
# a directory's READDIR records, where each starts (8-byte units), and the
# inode and file type of each entry (IndexNamespace.encoded_listing)
EncodedListing = tuple[bytes, array, list[int], bytes]


class IndexChildren:
    """A directory's names: its sorted index block, with names added or
    removed later on top. Behaves as the dict a log-built directory has."""

    __slots__ = ("ns", "reader", "ino", "extent", "count", "_base", "added", "removed")

    def __init__(self, ns: "IndexNamespace", ino: int, extent: int, count: int):
        self.ns, self.reader, self.ino = ns, ns.reader, ino
        self.extent, self.count = extent, count
        self._base = -1  # where the block starts, once it passed its check
        self.added: dict[bytes, int] = {}
        self.removed: set[bytes] = set()

    @property
    def base(self) -> int:
        """The name block, checked on first use (not when the directory's
        inode is built: a listing of its parent must not fail for it)."""
        if self._base < 0:
            self._base = self.ns.checked_dir(self.ino, self.extent, self.count)
        return self._base

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def block(self) -> NameBlock:
        """The index's names for this directory (checked), decoded at once;
        without what was added or removed since (see `changed`)."""
        block = self.ns.checked_block(self.ino, self.extent, self.count)
        self._base = self.reader.dir_base(self.ino, self.extent, self.count)
        return block

    def encoded(self) -> EncodedListing | None:
        """block() as READDIR records (see IndexNamespace.encoded_block)."""
        got = self.ns.encoded_block(self.ino, self.extent, self.count)
        if got is not None:
            self._base = self.reader.dir_base(self.ino, self.extent, self.count)
        return got

    def _base_get(self, name: bytes) -> int | None:
        if name in self.removed:
            return None
        base = self.base
        found = self.reader.find(self.ino, base, self.count, name)
        if found is None:
            return None
        entry, child = found
        if self.reader.stored_types:
            self.ns.check_stored_type(self.ino, child, self.reader.stored_type(base, entry))
        return child

    def get(self, name: bytes, default: int | None = None) -> int | None:
        child = self.added.get(name)
        if child is None:
            child = self._base_get(name)
        return default if child is None else child

    def __contains__(self, name: bytes) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: bytes) -> int:
        child = self.get(name)
        if child is None:
            raise KeyError(name)
        return child

    def __setitem__(self, name: bytes, child: int) -> None:
        self.added[name] = child  # a removed index name stays in `removed`

    def pop(self, name: bytes) -> int:
        if name in self.added:
            return self.added.pop(name)
        child = self._base_get(name)
        if child is None:
            raise KeyError(name)
        self.removed.add(name)
        return child

    def items(self) -> Iterator[tuple[bytes, int]]:
        block = self.block()
        if block.stored_types:
            self.ns.check_stored_types(self.ino, block)
        for name, child in zip(block.names, block.children):
            if name not in self.removed:
                yield name, child
        yield from self.added.items()

    def __iter__(self) -> Iterator[bytes]:
        return (name for name, _ in self.items())

    def keys(self) -> Iterator[bytes]:
        return iter(self)

    def values(self) -> Iterator[int]:
        return (child for _, child in self.items())

    def __len__(self) -> int:
        self.base  # noqa: B018 - a count is only believed once its block passed
        return self.count - len(self.removed) + len(self.added)

    def __bool__(self) -> bool:
        return len(self) > 0


class _Inodes:
    """ino -> Inode, built on demand; the `inodes` of an IndexNamespace."""

    def __init__(self, ns: "IndexNamespace"):
        self.ns = ns
        self.count = ns.reader.count
        self.pinned: dict[int, Inode] = {}
        self.live: weakref.WeakValueDictionary[int, Inode] = weakref.WeakValueDictionary()
        self.recent: OrderedDict[int, Inode] = OrderedDict()
        # Reads run in several threads and fills in another: one inode must
        # be one object (a fill into a twin would never reach its reader).
        self.lock = threading.Lock()

    def get(self, ino: int, default: Inode | None = None) -> Inode | None:
        with self.lock:
            node = self.pinned.get(ino) or self.live.get(ino)
            if node is None:
                if not 1 <= ino <= self.count:
                    return default
                node = self.ns.build(ino)
                self.live[ino] = node
            self.recent[ino] = node
            self.recent.move_to_end(ino)
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
            return node

    def __getitem__(self, ino: int) -> Inode:
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node

    def __contains__(self, ino: int) -> bool:
        return ino in self.pinned or 1 <= ino <= self.count

    def __setitem__(self, ino: int, node: Inode) -> None:
        with self.lock:
            self.pinned[ino] = node

    def __len__(self) -> int:
        return self.count + sum(1 for ino in self.pinned if ino > self.count)

    def __iter__(self) -> Iterator[int]:
        yield from range(1, self.count + 1)
        yield from sorted(ino for ino in self.pinned if ino > self.count)

    def keys(self) -> Iterator[int]:
        return iter(self)

    def values(self) -> Iterator[Inode]:
        return (self[ino] for ino in self)

    def items(self) -> Iterator[tuple[int, Inode]]:
        return ((ino, self[ino]) for ino in self)

    def known(self) -> Iterator[Inode]:
        """The inodes built so far (pinned or in use): no new ones built."""
        seen = dict(self.live.items())
        seen.update(self.pinned)
        return iter(list(seen.values()))


class IndexStat:
    """The fields of an inode a stat answer uses, read straight from its
    record (readdirplus of a big directory builds no inode). The full
    record is checked when the inode itself is built (an open, a readlink)."""

    __slots__ = ("ino", "mode", "size", "mtime_ns", "uid", "gid", "nlink", "parent", "rdev",
                 "target")

    def __init__(self, ino: int, fields: tuple):
        (self.mode, self.size, self.mtime_ns, self.uid, self.gid, self.nlink, parent, extent,
         count) = fields
        self.ino, self.target = ino, b""
        fmt = self.mode & 0o170000
        self.parent = parent if fmt == stat.S_IFDIR else 0
        self.rdev = extent if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
        if fmt == stat.S_IFLNK:
            self.size = count  # the target's length, which stat shows
        elif fmt not in _TYPES:
            raise damage(f"inode {ino}: unsupported file type {oct(self.mode)}")

    @property
    def is_dir(self) -> bool:
        return self.mode & 0o170000 == stat.S_IFDIR


_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
# the same and symlinks, as the byte a NameBlock's `types` holds (mode >> 12)
_LISTED_TYPES = bytes(t >> 12 for t in (*_TYPES, stat.S_IFLNK))
_DIR_TYPE = bytes([stat.S_IFDIR >> 12])


class IndexNamespace(Namespace):
    """A Namespace whose inodes come from an index (see the module doc).
    `local_maps`: the index's block maps describe this file's own blocks
    (False for a cache, whose index maps say where blocks are in the source).
    `limit()`: where the good log ends; blocks past it are absent."""

    def __init__(self, reader: IndexReader, *, local_maps: bool, data_end: int,
                 limit: Callable[[], int]):
        super().__init__()
        self.reader = reader
        self.local_maps = local_maps
        self.data_end = data_end
        self.limit = limit
        self.posix = bool(reader.header.flags & FLAG_POSIX)
        self.next_ino = reader.count + 1
        self.base_signed = False
        self.changed = False  # inodes or names added or removed over the index
        self._dirs_checked = bytearray((reader.count >> 3) + 1)
        self.inodes = _Inodes(self)  # type: ignore[assignment]

    def stat(self, ino: int):
        node = self.inodes.pinned.get(ino) or self.inodes.live.get(ino)
        if node is not None:
            return node
        if not 1 <= ino <= self.reader.count:
            return None
        self.reader.read_one()
        return IndexStat(ino, self.reader.stat_fields(ino))

    def may_have_xattrs(self, ino: int) -> bool:
        """As Namespace.may_have_xattrs, from the record's count when no
        inode is built: `ls -l` asks every file for security.selinux, and
        building each inode (its block maps decoded) cost ~22 us of the
        ~85 us each of those requests took here."""
        node = self.inodes.pinned.get(ino) or self.inodes.live.get(ino)
        if node is not None:
            return bool(node.xattrs)
        if not 1 <= ino <= self.reader.count:
            return True  # not ours to answer: the full path says ENOENT
        self.reader.read_one()
        return self.reader.xattr_count(ino) > 0

    def listing(self, node: Inode) -> tuple:
        """As Namespace.listing; a directory as the index has it, in one
        decode of its name block (no inode built, no stat per name)."""
        children = node.children
        if isinstance(children, IndexChildren) and not children.changed:
            block = children.block()
            return block.names, block.children, block.types, block.lengths
        return super().listing(node)

    def encoded_listing(self, node: Inode) -> EncodedListing | None:
        """As Namespace.encoded_listing: an unchanged directory's READDIR
        records straight from its name block (encoded_block)."""
        children = node.children
        if isinstance(children, IndexChildren) and not children.changed:
            return children.encoded()
        return None

    def files_after(self, after: int, count: int) -> list[int]:
        """Regular files in inode order from the records' modes alone."""
        out, reader = [], self.reader
        ino = max(after, 0) + 1
        while ino <= reader.count and len(out) < count:
            if stat.S_ISREG(reader.mode_of(ino)):
                out.append(ino)
            ino += 1
        extra = sorted(i for i, n in self.inodes.pinned.items()
                       if i > max(after, reader.count) and n.data is not None)
        return (out + extra)[:count]

    # --- building inodes ------------------------------------------------------

    def build(self, ino: int) -> Inode:
        self.reader.read_one()
        rec = self.reader.inode(ino)
        try:
            self.check_entry(rec.entry)
        except OSError as e:
            raise damage(f"inode {ino}: {e.strerror}") from None
        node = Inode(rec.entry, maps=False)
        node.nlink = rec.nlink
        node.signed = self.base_signed
        if not node.is_dir and rec.parent:
            raise damage(f"inode {ino}: only directories have a parent")
        if node.is_dir:
            node.parent = rec.parent
            node.children = IndexChildren(self, ino, rec.extent, rec.count)
        elif node.is_reg:
            self._check_counts(node, rec)
            if self.local_maps:
                node.data, node.hashes = self._maps(node, rec, local=True)
            else:  # a cache: its own blocks come from the log
                node.data = BlockMap(rec.count)
                node.hashes = BlockMap(rec.hash_count) if node.geometry is not None else None
        elif rec.count and not node.is_symlink or rec.hash_count:
            raise damage(f"inode {ino}: fields set that its type does not have")
        return node

    def checked_dir(self, ino: int, extent: int, count: int) -> int:
        """Where directory `ino`'s name block starts, checked once."""
        base = self.reader.dir_base(ino, extent, count)
        if not self._dirs_checked[ino >> 3] & (1 << (ino & 7)):
            self.checked_block(ino, extent, count)
        return base

    def checked_block(self, ino: int, extent: int, count: int) -> NameBlock:
        """Directory `ino`'s name block decoded, checked the first time."""
        block = self.reader.name_block(ino, self.reader.dir_base(ino, extent, count), count)
        if not self._dirs_checked[ino >> 3] & (1 << (ino & 7)):
            self._check_dir(ino, block)
            self._dirs_checked[ino >> 3] |= 1 << (ino & 7)
        return block

    def encoded_block(self, ino: int, extent: int, count: int) -> EncodedListing | None:
        """Directory `ino`'s name block as READDIR records (block_dirents),
        checked the first time as `checked_block` checks: the names' screen
        and order and children >= 2 in range are the encoder's (it answers
        None unless they pass), the rest `_check_children`'s. None: a block
        the encoder does not take (other layouts, or damage): `checked_block`
        then lists it or raises what is wrong."""
        reader = self.reader
        base = reader.dir_base(ino, extent, count)
        children, types = reader.listed(ino, base, count)
        got = block_dirents.encode(reader.block_bytes(base, count), count, types, 2, reader.count)
        if got is None:
            return None
        if not self._dirs_checked[ino >> 3] & (1 << (ino & 7)):
            self._check_children(ino, children, types, reader.stored_types)
            self._dirs_checked[ino >> 3] |= 1 << (ino & 7)
        return got[0], got[1], children, types

    def _check_dir(self, ino: int, block: NameBlock) -> None:
        """Once per directory: names valid and strictly sorted (so the binary
        search is right), children in range and of a known type, and each
        child directory's parent is this one (so no directory has two names
        and none is its own ancestor). Whole-block operations, not a loop
        per name: a cold walk checks every directory it lists."""
        names = block.names
        # a quick screen; check_name says which name is bad
        if block_dirents.maybe_bad_names(names, block.lengths):
            for name in names:
                try:
                    check_name(name)
                except OSError:
                    raise damage(f"directory {ino} holds a bad name {name[:40]!r}") from None
        if not block_dirents.strictly_ascending(names):
            raise damage(f"directory {ino}: names not sorted or not unique")
        if block.children and min(block.children) < 2:
            raise damage(f"directory {ino}: a name refers to inode 1 or to itself")
        self._check_children(ino, block.children, block.types, block.stored_types)

    def _check_children(self, ino: int, children: list[int], types: bytes,
                        stored_types: bool) -> None:
        """_check_dir's checks of the children (all >= 2 already): none is
        `ino`, each of a known type, each directory's parent is `ino`."""
        if ino in children:
            raise damage(f"directory {ino}: a name refers to inode 1 or to itself")
        if types.translate(None, _LISTED_TYPES):
            raise damage(f"directory {ino}: a child has an unsupported file type")
        if _DIR_TYPE in types:
            self._check_subdirs(ino, children, types, stored_types)

    def _check_subdirs(self, ino: int, children: list[int], types: bytes,
                       stored_types: bool) -> None:
        """Each child listed as a directory is one whose parent is `ino`;
        with stored types, its record must say directory too (one read of
        the record the parent check reads anyway)."""
        subdirs = [c for c, t in zip(children, types) if t == _DIR_TYPE[0]]
        reader = self.reader
        if len(subdirs) >= PREFETCH_FROM:
            reader.prefetch(subdirs)  # one wait for the disk, not one per subdirectory
        if len(set(subdirs)) != len(subdirs) or any(
                reader.parent_of(child) != ino for child in subdirs):
            raise damage(f"directory {ino}: a child directory has another parent")
        if stored_types and any(not stat.S_ISDIR(reader.mode_of(c)) for c in subdirs):
            raise damage(f"directory {ino}: a name's stored type is not its inode's")

    def check_stored_type(self, ino: int, child: int, d_type: int) -> None:
        """A name's stored d_type (COMPAT_DTYPES) must be its inode's type
        before the inode is served for that name (a lookup, a walk): a
        directory stored as a file would escape the one-parent check."""
        self.reader.read_one()
        if file_type(self.reader.mode_of(child)) != d_type:
            raise damage(f"directory {ino}: a name's stored type is not its inode's")

    def check_stored_types(self, ino: int, block: NameBlock) -> None:
        """check_stored_type for a whole block (a walk over every name)."""
        if self.reader.types_of(block.children) != block.types:
            raise damage(f"directory {ino}: a name's stored type is not its inode's")

    @staticmethod
    def _check_counts(node: Inode, rec: InodeRecord) -> None:
        hashes = node.geometry.hash_blocks if node.geometry is not None else 0
        if rec.count != block_count(node.size) or rec.hash_count != hashes:
            raise damage(f"file {node.ino}: block map does not match its size")

    def _maps(self, node: Inode, rec: InodeRecord,
              local: bool) -> tuple[BlockMap, BlockMap | None]:
        last = node.size - (rec.count - 1) * BLOCK_SIZE if rec.count else 0
        data, hashes = self.reader.map_columns(node.ino, rec.extent, rec.count,
                                               rec.hash_count, last, self.data_end)
        if node.geometry is None and data[2] is None:
            # only a hash tree may stand in for the CRCs
            raise damage(f"file {node.ino}: block map without checksums for a file "
                         "without a hash tree")
        data_map = self._checked(node.ino, data, rec.count, local)
        if node.geometry is None:
            return data_map, None
        return data_map, self._checked(node.ino, hashes, rec.hash_count, local)

    def _checked(self, ino: int, columns, count: int, local: bool) -> BlockMap:
        if not count:
            return BlockMap(0)
        offsets, infos, crcs = columns
        limit = self.limit() if local else 0
        for i in range(count):
            info = infos[i]
            if info == ABSENT:
                continue
            if info & 0x2000 or info & 0x1FFF > 4096:
                raise damage(f"file {ino}: block {i} has a stored size over 4096")
            if not local or info >> 14 == BlockKind.ZERO:
                continue
            end = offsets[i] + (info & 0x1FFF)
            if offsets[i] < LOG_START or end > self.data_end:
                raise damage(f"file {ino}: block {i} points outside the image's data")
            if end > limit:
                infos[i] = ABSENT  # cut off (a torn image): the block is absent
        return loaded_map(count, offsets, infos, crcs)

    def source_maps(self, ino: int) -> tuple[BlockMap, BlockMap | None] | None:
        """Where a cache's blocks are in its source (the index's maps)."""
        if self.local_maps or not 1 <= ino <= self.reader.count:
            return None
        rec = self.reader.inode(ino)
        node = self.get(ino)
        if not node.is_reg:
            return None
        return self._maps(node, rec, local=False)

    # --- live changes: pin what the index no longer describes ------------------

    def pin(self, node: Inode) -> None:
        self.inodes[node.ino] = node

    def add_inode(self, e) -> Inode:
        self.changed = True
        return super().add_inode(e)

    def link(self, child: int, parent: int, name: bytes) -> None:
        self.pin(self.inodes[parent])
        self.pin(self.inodes[child])
        self.changed = True
        super().link(child, parent, name)

    def unlink(self, parent: int, name: bytes) -> None:
        self.pin(self.inodes[parent])
        self.pin(self.lookup(parent, name))
        self.changed = True
        super().unlink(parent, name)

    def mark_signed(self) -> None:
        self.base_signed = True
        for node in self.inodes.known():
            node.signed = True

    def totals(self) -> dict[str, int]:
        """From the index header plus what changed: no inode is built for it.
        A packed image has every block of its index present, a cache none."""
        header = self.reader.header
        files, total = header.files, header.total_blocks
        present = total if self.local_maps else 0
        for node in list(self.inodes.pinned.values()):
            if node.data is None:
                continue
            count = node.data.count + (node.hashes.count if node.hashes else 0)
            now = node.data.present + (node.hashes.present if node.hashes else 0)
            if node.ino > self.reader.count:
                files, total = files + 1, total + count
                present += now
            else:
                present += now - (count if self.local_maps else 0)
        return {"files": files, "inodes": len(self), "blocks_total": total,
                "blocks_present": present}


class IndexSourceMaps:
    """`Image.source_maps` of an indexed cache: the source's block maps,
    read from the index on demand (never changed, so never kept long)."""

    def __init__(self, ns: IndexNamespace):
        self.ns = ns
        self.recent: OrderedDict[int, tuple[BlockMap, BlockMap | None]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, ino: int, default=None):
        with self.lock:
            maps = self.recent.get(ino)
        if maps is None:
            maps = self.ns.source_maps(ino)
            if maps is None:
                return default
            with self.lock:
                self.recent[ino] = maps
                if len(self.recent) > 256:
                    self.recent.popitem(last=False)
        return maps

    def __getitem__(self, ino: int):
        maps = self.get(ino)
        if maps is None:
            raise KeyError(ino)
        return maps

    def laid_out(self, ino: int) -> tuple[Span | None, Span | None] | None:
        """Per map of file `ino` (data, hash), (base, count) when its blocks
        lie back to back in the source, else None (IndexReader.laid_out):
        runs in source order without decoding the maps."""
        return self.ns.reader.laid_out(ino)

    def __contains__(self, ino: int) -> bool:
        return self.get(ino) is not None

    def __iter__(self) -> Iterator[int]:
        reader = self.ns.reader
        return (ino for ino in range(1, reader.count + 1)
                if stat.S_ISREG(reader.mode_of(ino)))

    def items(self):
        return ((ino, self[ino]) for ino in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

