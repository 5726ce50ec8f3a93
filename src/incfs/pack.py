"""Host side: turn a directory tree into a complete, optionally signed image.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import BLOCK_SIZE, ROOT_INO, codec
from .errors import UsageError
from .format.layout import RECORD_HEADER_SIZE, RecordType, Superblock, SuperFlags
from .format.records import (BlockKind, BlockRun, InodeEntry, InodeFlags, TreeKind,
                             block_info, encode_runs, place_block)
from .image import Image
from .integrity import merkle, signing
from .namespace import check_name

Progress = Callable[[int], None]  # called with bytes of source consumed
INODE_BATCH = 4096
RUN_BATCH_BLOCKS = 128 * 1024


@dataclass
class PackStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes_in: int = 0
    bytes_stored: int = 0
    blocks: int = 0
    zero_blocks: int = 0
    dedup_blocks: int = 0
    base_reused: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Source:
    """One source file with its inode number."""

    path: Path
    entry: InodeEntry


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


class _Packer:
    def __init__(self, src: Path, kind: BlockKind, progress: Progress | None,
                 base: Image | None, tmpdir: Path):
        self.src = src
        self.kind = kind
        self.progress = progress or (lambda n: None)
        self.stats = PackStats()
        self.sources: list[_Source] = []
        self.links: list[tuple[int, int, bytes]] = []
        self.inodes: list[InodeEntry] = []
        self.spools = {name: _Spool(tmpdir) for name in ("hash", "hot", "cold")}
        # placed[(ino, tree, index)] = (spool, offset, info, crc)
        self.placed: dict[tuple[int, int, int], tuple[str, int, int, int]] = {}
        self.by_hash: dict[bytes, tuple[str, int, int, int]] = {}
        self.base_blocks = _index_base(base) if base else {}
        self.base = base
        self.exclude: set[tuple[int, int]] = set()  # (dev, ino) never to pack

    # --- the tree ------------------------------------------------------------

    def scan(self) -> None:
        st = os.lstat(self.src)
        root = InodeEntry(ROOT_INO, stat.S_IFDIR | (st.st_mode & 0o7777), mtime_ns=st.st_mtime_ns)
        self.inodes.append(root)
        seen: dict[tuple[int, int], int] = {}
        self._scan_dir(self.src, ROOT_INO, seen)

    def _scan_dir(self, directory: Path, parent: int, seen: dict) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise UsageError(f"cannot read directory {directory}: {e.strerror}") from None
        for entry in entries:
            name = os.fsencode(entry.name)
            check_name(name)
            st = entry.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) in self.exclude:
                continue  # our own temporary image, when packing into the source
            ino = self._add_entry(Path(entry.path), st, seen)
            if ino is None:
                continue
            self.links.append((ino, parent, name))
            if stat.S_ISDIR(st.st_mode):
                self._scan_dir(Path(entry.path), ino, seen)

    def _add_entry(self, path: Path, st: os.stat_result, seen: dict) -> int | None:
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and key in seen:
            return seen[key]  # a hard link to a file already packed
        ino = len(self.inodes) + 1
        mode = st.st_mode & 0o7777
        if stat.S_ISREG(st.st_mode):
            entry = InodeEntry(ino, stat.S_IFREG | mode, st.st_size, st.st_mtime_ns,
                               flags=InodeFlags.HAS_TREE)
            self.sources.append(_Source(path, entry))
            seen[key] = ino
            self.stats.files += 1
        elif stat.S_ISDIR(st.st_mode):
            entry = InodeEntry(ino, stat.S_IFDIR | mode, 0, st.st_mtime_ns)
            self.stats.directories += 1
        elif stat.S_ISLNK(st.st_mode):
            target = os.fsencode(os.readlink(path))
            entry = InodeEntry(ino, stat.S_IFLNK | 0o777, len(target), st.st_mtime_ns,
                               target=target)
            self.stats.symlinks += 1
        else:
            self.stats.skipped.append(f"{path}: not a file, directory or symlink")
            return None
        entry.file_id = hashlib.sha256(b"incfs file id" + os.fsencode(path.relative_to(self.src))).digest()[:16]
        self.inodes.append(entry)
        return ino

    # --- the data ------------------------------------------------------------

    def pack_profile(self, profile: list[tuple[str, int]]) -> None:
        """Store the blocks a profile names first, in its order."""
        by_path = {str(s.path.relative_to(self.src)): s for s in self.sources}
        for rel, index in profile:
            source = by_path.get(rel.lstrip("/"))
            if source is None or index * BLOCK_SIZE >= source.entry.size:
                continue
            if (source.entry.ino, TreeKind.DATA, index) in self.placed:
                continue
            with open(source.path, "rb") as f:
                f.seek(index * BLOCK_SIZE)
                self._put_data(source.entry.ino, index, f.read(BLOCK_SIZE), "hot")

    def pack_files(self) -> None:
        for source in self.sources:
            hashes = self._pack_file(source)
            root, tree = merkle.build_tree(hashes, source.entry.size)
            source.entry.root_hash = root
            for i, block in enumerate(tree):
                stored = block
                offset = self.spools["hash"].put(BlockKind.RAW, stored)
                self.placed[(source.entry.ino, TreeKind.HASH, i)] = (
                    "hash", offset, block_info(BlockKind.RAW, len(stored)), zlib.crc32(stored))

    def _pack_file(self, source: _Source) -> Iterator[bytes]:
        ino, size = source.entry.ino, source.entry.size
        hashes = []
        try:
            with open(source.path, "rb") as f:
                for index in range(merkle.block_count(size)):
                    block = f.read(BLOCK_SIZE)
                    want = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
                    if len(block) != want:
                        raise UsageError(f"{source.path} changed size while packing")
                    hashes.append(self._put_data(ino, index, block, "cold"))
                    self.stats.bytes_in += len(block)
                    self.progress(len(block))
        except OSError as e:
            raise UsageError(f"cannot read {source.path}: {e.strerror}") from None
        return hashes

    def _put_data(self, ino: int, index: int, block: bytes, spool: str) -> bytes:
        """Store one data block (unless already placed); returns its hash."""
        digest = merkle.hash_block(block)
        key = (ino, TreeKind.DATA, index)
        if key in self.placed:
            return digest
        self.stats.blocks += 1
        dedup_key = digest + len(block).to_bytes(2, "little")
        if dedup_key in self.by_hash and not codec.is_zero(block):
            self.placed[key] = self.by_hash[dedup_key]
            self.stats.dedup_blocks += 1
            return digest
        kind, stored = self._encode(dedup_key, block)
        offset = self.spools[spool].put(kind, stored)
        placement = (spool, offset, block_info(kind, len(stored)), zlib.crc32(stored))
        self.placed[key] = placement
        if kind is BlockKind.ZERO:
            self.stats.zero_blocks += 1
        else:
            self.by_hash[dedup_key] = placement
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
        for (ino, tree, index) in sorted(self.placed):
            spool, rel, info, crc = self.placed[(ino, tree, index)]
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
         overwrite: bool = False) -> PackStats:
    """Pack directory `src` into a new image at `target`."""
    src, target = Path(src), Path(target)
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
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
    try:
        packer = _Packer(src, codec.COMPRESSIONS[compress], progress, base_img, tmpdir)
        tmp_st = os.stat(tmp_name)
        packer.exclude.add((tmp_st.st_dev, tmp_st.st_ino))
        packer.scan()
        packer.pack_profile(blocks_profile)
        packer.pack_files()
        _write_image(packer, Path(tmp_name), key)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        if base_img:
            base_img.close()
    return packer.stats


def _write_image(packer: _Packer, path: Path, key) -> None:
    img = Image.create(path, exist_ok=True, superblock=Superblock(uuid=os.urandom(16)))
    img.durable = False
    try:
        for i in range(0, len(packer.inodes), INODE_BATCH):
            img.add_inodes(packer.inodes[i:i + INODE_BATCH])
        for i in range(0, len(packer.links), INODE_BATCH):
            img.add_links(packer.links[i:i + INODE_BATCH])
        if key is not None:
            img.sign(key)
        # The payload comes after the block maps, whose size depends only on
        # block counts; lay the spools out first, then write maps and data.
        sizes = {name: packer.spools[name].size for name in ("hash", "hot", "cold")}
        _write_maps_and_data(img, packer, sizes)
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
                    data_start=payload, data_end=payload + total, packed_size=app.end)
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
            stored = os.pread(base.fd, info & 0x1FFF, offset)
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
