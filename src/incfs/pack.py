"""Host side: turn a directory, a tar archive or an OCI image into a complete,
optionally signed image (the inputs are in `incfs.inputs`).

Layout of a packed image, chosen for lazy remote mounts:

    superblock | inodes, names, signature, block maps | PAD | DATA payload:
                                                              hash trees, profiled blocks, the rest

Everything a mount needs to show the tree comes first (one ranged request),
hash-tree blocks sit at the front of the payload so verifying needs few extra
requests, and blocks named in a profile follow in the order a program read
them. Raw blocks are 4 KiB-aligned in the file so a kernel EROFS image can
later point straight at them.

The image is built under a temporary name beside the target and renamed into
place only when complete: a failed pack never leaves a half image behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

from . import BLOCK_SIZE, ROOT_INO, codec
from .errors import UsageError
from .format.layout import (MINOR_BASE, MINOR_INDEX, MINOR_POSIX, RECORD_HEADER_SIZE,
                            RecordType, Superblock, SuperFlags)
from .format.maps import MapKind
from .format.records import (MAX_SYMLINK, BlockKind, BlockRun, InodeEntry, InodeFlags,
                             TreeKind, block_info, encode_runs, place_block, xattr_problem)
from .image import Image
from .inputs import (DEFAULT_MAX_ENTRIES, Entry, Input, ListedInput, Tree, TreeInput,
                     open_input)
from .inputs.tree import ROOT as ROOT_NODE
from .integrity import merkle, signing
from .pack_blocks import Placements
from .pack_entries import compact, expand
from .pack_index import IndexWriter
from .pack_links import LogCollector

Progress = Callable[[int], None]  # called with bytes of source consumed
INODE_BATCH = 4096
INODE_BATCH_BYTES = 8 << 20
RUN_BATCH_BLOCKS = 128 * 1024


@dataclass
class PackStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    devices: int = 0
    fifos: int = 0
    sockets: int = 0
    hard_links: int = 0  # names beyond the first of an inode
    with_xattrs: int = 0  # inodes that have extended attributes
    bytes_in: int = 0
    bytes_stored: int = 0
    blocks: int = 0
    zero_blocks: int = 0
    dedup_blocks: int = 0
    base_reused: int = 0
    skipped: list[str] = field(default_factory=list)  # notes: entries skipped or ignored


class _Spool:
    """A temporary payload area. Offsets are relative to its start; it is
    placed at a 4 KiB-aligned position so alignment survives the move."""

    def __init__(self, directory: Path):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.cursor = 0

    def put(self, kind: BlockKind, stored: bytes) -> int:
        offset, self.cursor = place_block(self.cursor, kind, len(stored))
        if kind is not BlockKind.ZERO:
            self.file.seek(offset)
            self.file.write(stored)
        return offset

    @property
    def size(self) -> int:
        return (self.cursor + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE


class Sink(Protocol):
    """Where the packer hands the laid-out tree: each new inode as it is
    numbered (in inode order), then each name that leads to it."""

    def inode(self, e: InodeEntry, parent: int, names: list[bytes] | None,
              subdirs: int, kinds: tuple[MapKind, MapKind] = ...) -> None: ...

    def name(self, child: int, parent: int, name: bytes) -> None: ...

    def close(self) -> None: ...


class _Packer:
    """Reads entries as the input delivers them (a tar stream only once):
    each file's blocks go to the spools at once, keyed by a file number;
    inodes are numbered root 1, then depth first with names sorted, and
    handed to `sink` as they are numbered.

    A tar or OCI input builds the tree first (later entries win, hard links
    name earlier entries) and numbers it when it is complete (`consume` or
    the input's own `build`, then `layout`). A directory is walked in inode
    order as it is listed (`walk_listed`), with no tree."""

    def __init__(self, kind: BlockKind, progress: Progress | None, base: Image | None,
                 tmpdir: Path, profile: list[tuple[str, int]], sink: Sink):
        self.kind = kind
        self.progress = progress or (lambda n: None)
        self.stats = PackStats()
        self.sink = sink
        self.roots = bytearray()  # file number -> Merkle root, 32 bytes each
        self.file_of_ino = array("q", [-1])  # by inode number; -1: no packed file
        # a directory input's hard-linked files by first path: [kept entry, file number, ino]
        self.groups: dict[bytes, list] = {}
        self.linked: dict[int, int] = {}  # a tree's hard-linked inode nodes -> inode number
        self.spools = {name: _Spool(tmpdir) for name in ("hash", "hot", "cold")}
        # where each block went, by file number; after `run`, by inode
        self.placed = Placements()
        self.by_hash: dict[bytes, int] = {}  # hash + size -> slot of its first copy
        self.base_blocks = _index_base(base) if base else {}
        # Profiled ("hot") blocks are staged as they stream by and laid out
        # in profile order at the end.
        self.profile = profile
        self.hot_wanted: dict[bytes, set[int]] = {}
        for rel, index in profile:
            self.hot_wanted.setdefault(os.fsencode(rel).strip(b"/"), set()).add(index)
        self.hot_file: dict[bytes, int] = {}
        self.staged: dict[tuple[int, int], tuple[BlockKind, int, int, int]] = {}
        self.stage = tempfile.TemporaryFile(dir=tmpdir)

    def run(self, source: Input) -> None:
        """Read and number the whole input, then place the profiled blocks
        and key the block maps by inode number."""
        if isinstance(source, ListedInput):
            self.walk_listed(source)
        else:
            tree = Tree(problem=_entry_problem)
            if isinstance(source, TreeInput):
                source.build(tree, self._pack_file)
            else:
                self.consume(source, tree)
            self.stats.skipped.extend(source.notes)
            self.layout(tree)
        self._place_hot()
        # files replaced by a later entry got no inode: their blocks stay
        # unreachable in the spools, as before
        self.placed.number_inodes(self.file_of_ino)

    # --- a tree (tar, OCI, an image being compacted) ---------------------------

    def consume(self, source: Input, tree: Tree) -> None:
        """Each file's data is packed as the entry goes by: a tar stream is read once."""
        for entry in source.entries():
            node, new = tree.add(entry)
            if new and entry.is_reg:
                tree.key[node] = self._pack_file(entry)
            entry.data = None  # the opener holds the source open; not needed again

    def layout(self, tree: Tree) -> None:
        """Number the tree's inodes depth first, names in byte order; what
        is held is the listings of the directories on the walk's path."""
        stack = [self._enter_node(tree, b"", ROOT_NODE, 0)]
        while stack:
            parent, path, children = stack[-1]
            if not children:
                stack.pop()
                continue
            name, node = children.pop()
            node = tree.inode(node)
            child_path = path + b"/" + name if path else name
            if tree.is_dir(node):
                frame = self._enter_node(tree, child_path, node, parent)
                stack.append(frame)
                child = frame[0]
            else:
                child = self._node_inode(tree, child_path, node, parent)
            self.sink.name(child, parent, name)

    def _enter_node(self, tree: Tree, path: bytes, node: int,
                    parent: int) -> tuple[int, bytes, list[tuple[bytes, int]]]:
        """Number directory `node`; returns its inode number, path and
        children (last first, to be popped)."""
        children = tree.children(node)
        names = [name for name, _child in children]
        subdirs = sum(tree.is_dir(child) for _name, child in children)
        ino = self._add_inode(path, tree.entry(node), None, parent, names, subdirs)
        children.reverse()
        return ino, path, children

    def _node_inode(self, tree: Tree, path: bytes, node: int, parent: int) -> int:
        """A non-directory's inode number: a new one, or for an inode with
        several names the one its first name in the walk got."""
        linked = tree.is_linked(node)
        if linked and node in self.linked:
            self.stats.hard_links += 1
            return self.linked[node]
        key = tree.key[node]
        ino = self._add_inode(path, tree.entry(node), key if key >= 0 else None, parent,
                              None, 0)
        if linked:
            self.linked[node] = ino
        return ino

    # --- a directory, walked in inode order ------------------------------------------

    def walk_listed(self, source: ListedInput) -> None:
        """Each directory is listed, and its files packed, when the walk
        enters it, so data lands in the order `source.entries()` gives (a
        directory's files before its subdirectories'); what is held is the
        listings of the directories on the walk's path."""
        root = source.root_entry()
        stack = [self._enter(source, root, 0)]
        while stack:
            parent, children = stack[-1]
            if not children:
                stack.pop()
                continue
            entry, number = children.pop()
            if entry.is_dir:
                child, grandchildren = self._enter(source, entry, parent)
                stack.append((child, grandchildren))
            else:
                child = self._listed_inode(entry, number, parent)
            self.sink.name(child, parent, _base_name(entry.path))
        self.stats.skipped.extend(source.notes)

    def _enter(self, source: ListedInput, entry: Entry,
               parent: int) -> tuple[int, list[tuple[Entry, int | None]]]:
        """Number directory `entry` and pack the files it holds; returns its
        inode number and its children (last first, to be popped)."""
        listing = source.listing(entry.path)
        children = [(e, self._pack_listed(e)) for e in listing]
        names = [_base_name(e.path) for e in listing]
        ino = self._add_inode(entry.path, entry, None, parent, names,
                              sum(e.is_dir for e in listing))
        children.reverse()
        return ino, children

    def _pack_listed(self, e: Entry) -> int | None:
        """Pack a listed regular file; returns its file number. A file with
        other names is kept until the walk first meets one of them."""
        if e.link is not None:
            if e.link not in self.groups:
                raise UsageError(f"{e.origin}: hard link to {e.link!r}, which is not an "
                                 "earlier entry")
            return None
        number = self._pack_file(e) if e.is_reg else None
        e.data = None
        if e.shared:
            self.groups[e.path] = [_keep(e), number, 0]
        return number

    def _listed_inode(self, e: Entry, number: int | None, parent: int) -> int:
        if e.link is None and not e.shared:
            return self._add_inode(e.path, e, number, parent, None, 0)
        group = self.groups[e.link if e.link is not None else e.path]
        if group[2]:
            self.stats.hard_links += 1
        else:  # the first of its names in inode order, as a tree's walk has it
            group[2] = self._add_inode(e.path, group[0], group[1], parent, None, 0)
        return group[2]

    # --- numbering ----------------------------------------------------------------------

    def _add_inode(self, path: bytes, kept: Entry | bytes, number: int | None, parent: int,
                   names: list[bytes] | None, subdirs: int) -> int:
        """Number the next inode and hand it to the sink; `number` is its
        packed file's, `names` (directories) its children's, sorted."""
        ino = len(self.file_of_ino)
        entry = self._inode(ino, path, kept, number)
        if number is None:
            self.sink.inode(entry, parent, names, subdirs)
        else:  # its blocks are placed: their map's layout can be fixed
            self.sink.inode(entry, parent, names, subdirs,
                            self.placed.map_kinds(number, entry.size))
        self.file_of_ino.append(-1 if number is None else number)
        return ino

    def _inode(self, ino: int, path: bytes, kept: Entry | bytes,
               number: int | None) -> InodeEntry:
        e = expand(kept)
        why = _entry_problem(e)
        if why:
            raise UsageError(f"{e.origin}: {why}")
        xattrs = tuple(sorted(e.xattrs.items())) if e.xattrs else ()
        file_id = e.file_id
        if file_id is None:
            file_id = hashlib.sha256(b"incfs file id" + path).digest()[:16] if path else bytes(16)
        out = InodeEntry(ino, e.mode, 0, e.mtime_ns, file_id, uid=e.uid, gid=e.gid,
                         xattrs=xattrs, metadata=e.metadata)
        self.stats.with_xattrs += bool(xattrs)
        fmt = stat.S_IFMT(e.mode)
        if fmt == stat.S_IFREG:
            out.size, out.root_hash = e.size, bytes(self.roots[32 * number:32 * number + 32])
            out.flags = InodeFlags.HAS_TREE
            self.stats.files += 1
        elif fmt == stat.S_IFDIR:
            self.stats.directories += ino != ROOT_INO
        elif fmt == stat.S_IFLNK:
            out.mode, out.size, out.target = stat.S_IFLNK | 0o777, len(e.target), e.target
            self.stats.symlinks += 1
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            out.rdev = e.rdev
            self.stats.devices += 1
        elif fmt == stat.S_IFIFO:
            self.stats.fifos += 1
        elif fmt == stat.S_IFSOCK:
            self.stats.sockets += 1
        return out

    # --- the data ------------------------------------------------------------

    def _pack_file(self, entry: Entry) -> int:
        """Store a file's blocks and hash tree; returns its file number."""
        number = self.placed.begin_file(merkle.block_count(entry.size))
        assert number == len(self.roots) // 32, (number, len(self.roots))
        hot = self.hot_wanted.get(entry.path)
        if hot:
            self.hot_file[entry.path] = number  # a later entry for the name wins
        hashes = self._read_file(entry, number, hot)
        root, tree = merkle.build_tree(hashes, entry.size)
        self.roots += root
        self.placed.begin_hashes(number, len(tree))
        for i, block in enumerate(tree):
            offset = self.spools["hash"].put(BlockKind.RAW, block)
            self.placed.set(self.placed.slot(number, TreeKind.HASH, i), (
                "hash", offset, block_info(BlockKind.RAW, len(block)), zlib.crc32(block)))
        return number

    def _read_file(self, entry: Entry, number: int, hot: set[int] | None) -> list[bytes]:
        size, hashes = entry.size, []
        if not size:
            # nothing to read, so not opened: for a directory of a million
            # empty files the open was a quarter of pack's time
            return hashes
        try:
            with entry.data() as f:
                for index in range(merkle.block_count(size)):
                    want = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
                    block = _read_exact(f, want)
                    if len(block) != want:
                        raise UsageError(f"{entry.origin}: fewer bytes than its size ({size}); "
                                         "it changed while packing or the archive is cut short")
                    hashes.append(self._put_data(number, index, block, hot))
                    self.stats.bytes_in += len(block)
                    self.progress(len(block))
        except OSError as e:
            raise UsageError(f"cannot read {entry.origin}: {e.strerror or e}") from None
        return hashes

    def _place_hot(self) -> None:
        """Lay the staged profile blocks out in profile order."""
        for rel, index in self.profile:
            number = self.hot_file.get(os.fsencode(rel).strip(b"/"))
            staged = self.staged.pop((number, index), None)
            if staged is None:
                continue
            kind, offset, length, crc = staged
            self.stage.seek(offset)
            stored = self.stage.read(length)
            where = self.spools["hot"].put(kind, stored)
            self.placed.set(self.placed.slot(number, TreeKind.DATA, index),
                            ("hot", where, block_info(kind, length), crc))
        # Left over: blocks of an earlier file under a profiled name that a
        # later entry replaced (it may live on under a hard link).
        for (number, index), (kind, offset, length, crc) in sorted(self.staged.items()):
            self.stage.seek(offset)
            where = self.spools["hot"].put(kind, self.stage.read(length))
            self.placed.set(self.placed.slot(number, TreeKind.DATA, index),
                            ("hot", where, block_info(kind, length), crc))
        self.staged.clear()

    def _stage(self, number: int, index: int, dedup_key: bytes, block: bytes) -> None:
        if (number, index) in self.staged:
            return
        kind, stored = self._encode(dedup_key, block)
        if kind is BlockKind.ZERO:
            self.placed.set(self.placed.slot(number, TreeKind.DATA, index),
                            ("cold", 0, block_info(kind, 0), 0))
            self.stats.zero_blocks += 1
            return
        offset = self.stage.seek(0, os.SEEK_END)
        self.stage.write(stored)
        self.staged[(number, index)] = (kind, offset, len(stored), zlib.crc32(stored))
        self.stats.bytes_stored += len(stored)

    def _put_data(self, number: int, index: int, block: bytes, hot: set[int] | None) -> bytes:
        """Store one data block; returns its hash."""
        digest = merkle.hash_block(block)
        slot = self.placed.slot(number, TreeKind.DATA, index)
        self.stats.blocks += 1
        dedup_key = digest + len(block).to_bytes(2, "little")
        if hot and index in hot:
            self._stage(number, index, dedup_key, block)
            return digest
        spool = "cold"
        if dedup_key in self.by_hash and not codec.is_zero(block):
            self.placed.set(slot, self.placed.at(self.by_hash[dedup_key]))
            self.stats.dedup_blocks += 1
            return digest
        kind, stored = self._encode(dedup_key, block)
        offset = self.spools[spool].put(kind, stored)
        placement = (spool, offset, block_info(kind, len(stored)), zlib.crc32(stored))
        self.placed.set(slot, placement)
        if kind is BlockKind.ZERO:
            self.stats.zero_blocks += 1
        else:
            self.by_hash[dedup_key] = slot
            self.stats.bytes_stored += len(stored)
        return digest

    def _encode(self, dedup_key: bytes, block: bytes) -> tuple[BlockKind, bytes]:
        reused = self.base_blocks.get(dedup_key)
        if reused is not None:
            self.stats.base_reused += 1
            return reused
        return codec.compress(block, self.kind)

    # --- the image -----------------------------------------------------------

    def runs(self, spool_base: dict[str, int]) -> Iterator[BlockRun]:
        """Block runs in file order, cut wherever the placement rule breaks
        (a deduplicated block, a different spool)."""
        current: BlockRun | None = None
        cursor = 0
        for ino, tree, index, (spool, rel, info, crc) in self.placed.placed():
            kind = BlockKind(info >> 14)
            absolute = spool_base[spool] + rel if kind is not BlockKind.ZERO else 0
            extends = (current is not None and current.ino == ino and current.tree == tree
                       and current.first + len(current.blocks) == index)
            if extends:
                expect, nxt = place_block(cursor, kind, info & 0x1FFF)
                if expect == absolute or kind is BlockKind.ZERO:
                    current.blocks.append((info, crc))
                    cursor = nxt
                    continue
            if current is not None:
                yield current
            current = BlockRun(ino, TreeKind(tree), index, absolute, [(info, crc)])
            _, cursor = place_block(absolute, kind, info & 0x1FFF)
        if current is not None:
            yield current


def pack(src: str | os.PathLike, target: str | os.PathLike, *, compress: str = "zstd",
         sign_key: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
         profile: str | os.PathLike | None = None, progress: Progress | None = None,
         overwrite: bool = False, stdin: BinaryIO | None = None,
         max_entries: int = DEFAULT_MAX_ENTRIES, index: bool = True) -> PackStats:
    """Pack `src` into a new image at `target`. `src` is a directory, a tar
    archive (plain or compressed), "-" for a tar stream on `stdin` (default
    sys.stdin), or "oci:DIR[:TAG]" (see `incfs.inputs`). The metadata is
    an index (format 1.2) unless `index` is False (the 1.0/1.1 log records,
    for tools and tests that want the older layout)."""
    target = Path(target)
    exclude: set[tuple[int, int]] = set()
    # an Input object itself (compaction hands in an image's tree)
    source = src if hasattr(src, "entries") else open_input(src, stdin=stdin, exclude=exclude,
                                                            max_entries=max_entries)
    if target.exists() and not overwrite:
        raise UsageError(f"{target} already exists")
    if compress not in codec.COMPRESSIONS:
        raise UsageError(f"unknown compression {compress!r}")
    key = signing.load_private(sign_key) if sign_key else None
    if key is not None:
        signing.algorithm_of(key)
    blocks_profile = load_profile(profile) if profile else []
    base_img = Image.open(base) if base else None
    tmpdir = target.parent if target.parent.exists() else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=tmpdir)
    os.close(fd)
    sink: IndexWriter | LogCollector | None = None
    try:
        sink = IndexWriter(tmpdir) if index else LogCollector()
        packer = _Packer(codec.COMPRESSIONS[compress], progress, base_img, tmpdir,
                         blocks_profile, sink)
        tmp_st = os.stat(tmp_name)
        exclude.add((tmp_st.st_dev, tmp_st.st_ino))  # packing into the source tree
        packer.run(source)
        if isinstance(sink, IndexWriter):
            _write_indexed_image(packer, sink, Path(tmp_name), key)
        else:
            _write_image(packer, sink, Path(tmp_name), key)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        if sink is not None:
            sink.close()
        source.close()
        if base_img:
            base_img.close()
    return packer.stats


_KNOWN_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK)


def _entry_problem(e: Entry) -> str | None:
    """Why an entry cannot become an inode (the message without its origin)."""
    why = xattr_problem(tuple(sorted(e.xattrs.items()))) if e.xattrs else None
    if why:
        return why
    fmt = stat.S_IFMT(e.mode)
    if fmt not in _KNOWN_TYPES:
        return f"unknown file type {oct(e.mode)}"
    if fmt == stat.S_IFLNK and len(e.target) > MAX_SYMLINK:
        return f"symlink target longer than {MAX_SYMLINK} bytes"
    return None


def _keep(e: Entry) -> Entry | bytes:
    """A directory input's hard-linked entry as it waits for its inode: a
    plain one packed into bytes, one with a problem whole, so numbering
    reports it with its origin."""
    if _entry_problem(e) is not None:
        return e
    return compact(e)


def _base_name(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def _inode_batches(inodes: list[InodeEntry]) -> Iterator[list[InodeEntry]]:
    """At most INODE_BATCH inodes and about INODE_BATCH_BYTES per record
    (extended attributes can make one inode a megabyte)."""
    batch: list[InodeEntry] = []
    size = 0
    for e in inodes:
        cost = 102 + len(e.metadata) + len(e.target) + sum(5 + len(n) + len(v)
                                                           for n, v in e.xattrs)
        if batch and (len(batch) >= INODE_BATCH or size + cost > INODE_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += cost
    if batch:
        yield batch


def _read_exact(f, n: int) -> bytes:
    """`n` bytes, fewer only at the end (a tar member's read can be short)."""
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _write_image(packer: _Packer, tree: LogCollector, path: Path, key) -> None:
    img = Image.create(path, exist_ok=True, superblock=Superblock(uuid=os.urandom(16)))
    img.durable = False
    try:
        for batch in _inode_batches(tree.inodes):
            img.add_inodes(batch)
        for i in range(0, len(tree.links), INODE_BATCH):
            img.add_links(tree.links[i:i + INODE_BATCH])
        if key is not None:
            img.sign(key)
        # The payload comes after the block maps, whose size depends only on
        # block counts; lay the spools out first, then write maps and data.
        sizes = {name: packer.spools[name].size for name in ("hash", "hot", "cold")}
        _write_maps_and_data(img, packer, sizes)
        os.fsync(img.fd)
    finally:
        img.close()


def _spool_layout(packer: _Packer) -> tuple[dict[str, int], int]:
    """Each spool's place inside the payload, and the payload's size."""
    sizes = {name: packer.spools[name].size for name in ("hash", "hot", "cold")}
    rel = {"hash": 0, "hot": sizes["hash"], "cold": sizes["hash"] + sizes["hot"]}
    return rel, sum(sizes.values())


def _write_indexed_image(packer: _Packer, index: IndexWriter, path: Path, key) -> None:
    """superblock | INDEX | SIGNATURE | PAD | DATA: the index holds every
    inode, name and block map; the image is reopened to sign it, which also
    reads back what was written."""
    uuid = os.urandom(16)
    rel, total = _spool_layout(packer)
    img = Image.create(path, exist_ok=True, superblock=Superblock(uuid=uuid))
    try:
        plan = index.finish(img.fd, img.appender, packer.placed, rel)
    finally:
        img.close()
    img = Image.open(path, writable=True)
    img.durable = False
    try:
        if key is not None:
            img.sign(key)
        app = img.appender
        meta_end = app.end
        app.pad_to(plan.payload - RECORD_HEADER_SIZE)
        app.begin_data(total)
        for name in ("hash", "hot", "cold"):
            _copy_spool(packer.spools[name], img.fd, plan.payload + rel[name])
        os.ftruncate(img.fd, app.end)
        sb = Superblock(uuid=uuid, flags=SuperFlags.PACKED, meta_end=meta_end,
                        data_start=plan.payload, data_end=plan.payload + total,
                        packed_size=app.end, version_minor=MINOR_INDEX)
        os.pwrite(img.fd, sb.encode(), 0)
        os.fsync(img.fd)
    finally:
        img.close()


def _write_maps_and_data(img: Image, packer: _Packer, sizes: dict[str, int]) -> None:
    # Dry run to learn how big the map records are: run boundaries do not
    # depend on the absolute base as long as it is 4 KiB-aligned.
    probe_base = {"hash": 0, "hot": sizes["hash"], "cold": sizes["hash"] + sizes["hot"]}
    map_bytes = sum(_encoded_size(b) for b in _batches(packer.runs(probe_base)))
    app = img.appender
    meta_end_estimate = app.end + map_bytes + 32 * (map_bytes // (1 << 20) + 2)
    # Reserve: PAD goes after the maps; the payload starts at the next 4 KiB
    # boundary past the maps plus room for two headers.
    payload = (meta_end_estimate + 2 * 32 + 4095) // 4096 * 4096
    payload += 4096  # slack so the PAD record always fits
    spool_base = {name: payload + rel for name, rel in probe_base.items()}
    for batch in _batches(packer.runs(spool_base)):
        app.append(RecordType.BLOCKS, encode_runs(batch))
    meta_end = app.end
    app.pad_to(payload - RECORD_HEADER_SIZE)  # the DATA header ends on the boundary
    total = sum(sizes.values())
    payload_offset = app.begin_data(total)
    assert payload_offset == payload, (payload_offset, payload)
    for name in ("hash", "hot", "cold"):
        _copy_spool(packer.spools[name], img.fd, spool_base[name])
    os.ftruncate(img.fd, app.end)
    sb = Superblock(uuid=img.superblock.uuid, flags=SuperFlags.PACKED, meta_end=meta_end,
                    data_start=payload, data_end=payload + total, packed_size=app.end,
                    version_minor=MINOR_POSIX if img.ns.posix else MINOR_BASE)
    os.pwrite(img.fd, sb.encode(), 0)


def _batches(runs: Iterator[BlockRun]) -> Iterator[list[BlockRun]]:
    batch, count = [], 0
    for run in runs:
        batch.append(run)
        count += len(run.blocks)
        if count >= RUN_BATCH_BLOCKS:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def _encoded_size(batch: list[BlockRun]) -> int:
    body = 4 + sum(28 + 6 * len(r.blocks) for r in batch)
    return (32 + body + 7) // 8 * 8


def _copy_spool(spool: _Spool, fd: int, offset: int) -> None:
    spool.file.flush()
    src = spool.file.fileno()
    length = spool.cursor
    done = 0
    while done < length:
        n = os.copy_file_range(src, fd, length - done, done, offset + done)
        if n <= 0:
            raise OSError("copy_file_range made no progress")
        done += n


def _index_base(base: Image) -> dict[bytes, tuple[BlockKind, bytes]]:
    """hash+size of every data block of the base image -> its stored form,
    so identical blocks are copied (no recompression) into the new image."""
    index = {}
    for node in base.ns.inodes.values():
        if node.data is None:
            continue
        for i, offset, info, _crc in node.data.entries():
            kind = BlockKind(info >> 14)
            if kind is BlockKind.ZERO:
                continue
            plain = base.read_block(node, i)
            stored = base.stored_bytes(node, offset, info & 0x1FFF)  # maybe a plain copy
            index[merkle.hash_block(plain) + len(plain).to_bytes(2, "little")] = (kind, stored)
    return index


def load_profile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """A profile is JSON: {"version": 1, "blocks": [[path, block_index], ...]}."""
    try:
        data = json.loads(Path(path).read_text())
        return [(str(p), int(i)) for p, i in data["blocks"]]
    except OSError as e:
        raise UsageError(f"cannot read profile {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not an incfs profile") from None
