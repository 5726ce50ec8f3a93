"""Image: the namespace and block presence over one backing file.

This is the library every other layer uses (its reading half, the verified
read path, is verified_read.py; its writing half, fills from loaders, is
fills.py): `pack` writes images, `fusefs`
reads blocks through it, the control server and the built-in loader change
the tree and fill blocks through it. It never fetches anything: a block is
either here (and verified) or absent.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from pathlib import Path

from . import ROOT_INO
from .blockmap import BlockMap
from .errors import CorruptImage, IntegrityError, UsageError, os_error
from .format import layout, records
from .format.index import IndexHeader, IndexReader, check_crcs
from .format.layout import (LOG_START, RECORD_ALIGN, RECORD_HEADER_SIZE, RecordFlags,
                            RecordType, SuperFlags, Superblock)
from .format.log import LogAppender, ScanResult, scan_log
from .format.records import (BlockKind, BlockRun, DirentEntry, DirentOp,
                             InodeEntry, InodeFlags, SignatureEntry, TreeKind,
                             info_kind, info_size)
from .index_ns import IndexNamespace, IndexSourceMaps
from .integrity import merkle
from .namespace import Inode, Namespace, check_name
from .space import release as space_release
from .space.plainfiles import PlainFiles
from .fills import FillBlock, FillResult, Fills
from .verified_read import MissingBlock, VerifiedReads

# Callers take the fill and read types from here, with the Image they go with.
__all__ = ["FillBlock", "FillResult", "Image", "MissingBlock", "SignatureState"]

METADATA_BATCH = 1 << 20


class SignatureState:
    """A signature record met while the log was read, and what came of it."""

    def __init__(self, entry: SignatureEntry, root: bytes) -> None:
        self.entry = entry
        self.root = root  # canonical root computed at the signature record
        self.verified = False
        self.names_after = False  # a DIRENTS record follows it in the log


class Image(Fills, VerifiedReads):
    """An open backing image. Use `Image.create` or `Image.open`."""

    def __init__(self, path: Path, fd: int, superblock: Superblock, writable: bool):
        self.path = path
        self.fd = fd
        self.superblock = superblock
        self.writable = writable
        self.ns: Namespace = Namespace()
        self.signature: SignatureState | None = None
        self.source_maps: dict[int, tuple[BlockMap, BlockMap | None]] = {}
        self.index: IndexReader | None = None  # the INDEX record's regions, mapped
        self._index_map: mmap.mmap | None = None
        self._index_root: bytes | None = None
        self._index_body = b""
        self.scan: ScanResult | None = None
        self._block_limit: int | None = None  # blocks must end by here to count
        self.blocks_beyond_log = 0  # mapped blocks whose bytes are not in the good log
        self._max_mapped_end = 0  # highest byte any block map names
        self.appender: LogAppender | None = None
        self.durable = True  # fdatasync before a fill or change returns
        self._hash_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        # Reads run in several threads at once (fills in one more); only
        # this cache is shared mutable state on the read path.
        self._hash_lock = threading.Lock()
        self._forgotten: set[tuple[int, int, int]] = set()  # bad blocks to refill
        self.counters = {"verify_failures": 0, "blocks_stored": 0, "bytes_stored": 0}
        self.plain = PlainFiles(path)  # plain copies released blocks live in (incfs.space)
        self.plain_inos: set[int] = set()

    # --- opening -------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, image_uuid: bytes | None = None,
               superblock: Superblock | None = None, exist_ok: bool = False) -> "Image":
        """A new, empty image holding only the root directory."""
        path = Path(path)
        # A new empty image is built unnamed and linked in only once its root
        # is on disk: a crash (kill -9, power loss) while creating it must not
        # leave a file at `path` that every later open refuses.
        atomic = superblock is None and not exist_ok
        fd, tmp = _open_unnamed(path) if atomic else (-1, None)
        if fd < 0:
            atomic = False
            flags = os.O_RDWR | os.O_CREAT | (0 if exist_ok else os.O_EXCL)
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                raise UsageError(f"{path} already exists") from None
        try:
            _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        sb = superblock or Superblock(uuid=image_uuid or uuidlib.uuid4().bytes)
        os.pwrite(fd, sb.encode(), 0)
        img = cls(path, fd, sb, True)
        img.scan = ScanResult(end=LOG_START, last_record=0, file_size=LOG_START)
        img.appender = LogAppender(fd, LOG_START, 0)
        try:
            if superblock is None:
                root = InodeEntry(ROOT_INO, stat.S_IFDIR | 0o555, mtime_ns=time.time_ns())
                img._append_inodes([root])
            if atomic:
                os.fdatasync(fd)
                _link_unnamed(tmp, path)
        except BaseException:
            os.close(fd)
            if atomic:
                tmp.unlink(missing_ok=True)
            raise
        return img

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False) -> "Image":
        """Open an image, replaying its log; a torn tail is dropped (and cut
        off when writable). `scan.dropped_reason` says what was dropped."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise UsageError(f"cannot open {path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"{path} is not a regular file")
            if writable:
                _lock(fd, path)
            img = cls(path, fd, Superblock.decode(os.pread(fd, layout.SUPERBLOCK_SIZE, 0)),
                      writable)
            img._replay()
        except BaseException:
            os.close(fd)
            raise
        return img

    def _replay(self) -> None:
        size = os.fstat(self.fd).st_size
        self._block_limit = size
        self._scan_records(size)
        if self.scan.end < size:
            # A torn or damaged tail was dropped. A block counts only if its
            # bytes lie inside the good log (a packed image maps its blocks
            # before the DATA record that holds them), so replay once more
            # with the good end as the bound: blocks in the tail are absent.
            self.ns = Namespace()
            self.signature = None
            self.source_maps = {}
            self._drop_index()
            self._block_limit = self.scan.end
            self._scan_records(size)
        if ROOT_INO not in self.ns.inodes:
            raise CorruptImage("image has no root directory")
        space_release.check_plain_copies(self)
        if self.writable:
            if self.scan.end < size:
                os.ftruncate(self.fd, self.scan.end)
            self.appender = LogAppender(self.fd, self.scan.end, self.scan.last_record)
            if self._max_mapped_end > self.scan.end:
                # Maps before the cut still name offsets past it; new data
                # must never land there, or on the next open those stale maps
                # would claim the new bytes. Skip the range with a PAD record.
                self.appender.pad_past(self._max_mapped_end)

    def _scan_records(self, size: int) -> None:
        self.blocks_beyond_log = 0
        self._max_mapped_end = 0
        self.plain_inos = set()
        with os.fdopen(os.dup(self.fd), "rb", buffering=1 << 20) as f:
            self.scan = scan_log(f, size, self._apply_record)

    def _apply_record(self, offset: int, header, body: bytes) -> None:
        try:
            if header.type == RecordType.INDEX:
                self._load_index(offset, header, body)
                return
            self._apply(header.type, body, header.flags)
        except OSError as e:
            raise CorruptImage(f"record at offset {offset} is invalid: {e.strerror}") from None
        except CorruptImage as e:
            raise CorruptImage(f"record at offset {offset}: {e}") from None

    def _apply(self, rtype: int, body: bytes, flags: int = 0) -> None:
        if rtype in (RecordType.INODES, RecordType.INODES2):
            decode = records.decode_inodes if rtype == RecordType.INODES else records.decode_inodes2
            for e in decode(body):
                if rtype == RecordType.INODES and stat.S_IFMT(e.mode) not in records.V1_TYPES:
                    # 1.0 readers refuse other types here; so do we, or an
                    # image could mean different things to the two
                    raise CorruptImage(f"inode {e.ino}: an INODES record holds only "
                                       "files, directories and symlinks")
                self.ns.check_add_inode(e)
                self.ns.add_inode(e)
        elif rtype == RecordType.DIRENTS:
            if self.signature is not None:
                self.signature.names_after = True
            for d in records.decode_dirents(body):
                self._apply_dirent(d)
        elif rtype == RecordType.BLOCKS:
            replace = bool(flags & RecordFlags.REPLACES)
            for run in records.decode_runs(body):
                self._apply_run(run, self._maps_of(run.ino), replace=replace)
        elif rtype == RecordType.SOURCE_BLOCKS:
            for run in records.decode_runs(body):
                self._apply_run(run, self._source_maps_of(run.ino), check_bounds=False)
        elif rtype == RecordType.RELEASED:
            space_release.apply(self, body)
        elif rtype == RecordType.SIGNATURE:
            entry = records.decode_signature(body)
            self.signature = SignatureState(entry, self.canonical_root())
            self.ns.mark_signed()

    def _load_index(self, offset: int, header, body: bytes) -> None:
        """Map the index and serve the namespace from it. It must be the
        first record, so everything later in the log is an overlay."""
        if len(self.ns) or self.index is not None:
            raise CorruptImage("an index record must be the first record of the log")
        head = IndexHeader.decode(body)
        self._index_body = body  # hashed as stored into the index root
        start = offset + _aligned(RECORD_HEADER_SIZE + header.body_len)
        end = offset + header.length
        head.check_layout(start, end)
        check_crcs(head, self.fd)
        self._index_map = mmap.mmap(self.fd, end, prot=mmap.PROT_READ)
        # Start reading the index in the background: a walk of a cold index
        # would otherwise wait on one page fault after another. The pages
        # land in the page cache, not in our resident set.
        self._index_map.madvise(mmap.MADV_WILLNEED)
        self.index = IndexReader(self._index_map, head, self.fd)
        if not stat.S_ISDIR(self.index.mode_of(ROOT_INO)):
            raise CorruptImage("the index's root (inode 1) is not a directory")
        cache = bool(self.superblock.flags & SuperFlags.CACHE)
        data_end = self.superblock.data_end or self.scan_limit()
        self.ns = IndexNamespace(self.index, local_maps=not cache, data_end=data_end,
                                 limit=self.scan_limit)
        if cache:
            self.source_maps = IndexSourceMaps(self.ns)  # type: ignore[assignment]
        elif self.writable:
            # new blocks must never land where the index says blocks are
            self._max_mapped_end = max(self._max_mapped_end, data_end)

    def _drop_index(self) -> None:
        self.index = None
        self._index_root = None
        if self._index_map is not None:
            try:
                self._index_map.close()
            except BufferError:
                pass  # a view of it is still alive: the mapping goes with it
            self._index_map = None

    def _apply_dirent(self, d: DirentEntry) -> None:
        if d.op == DirentOp.ADD:
            self.ns.check_link(d.child, d.parent, d.name)
            self.ns.link(d.child, d.parent, d.name)
        else:
            self.ns.check_unlink(d.parent, d.name)
            self.ns.unlink(d.parent, d.name)

    def _maps_of(self, ino: int) -> tuple[BlockMap, BlockMap | None]:
        node = self.ns.inodes.get(ino)
        if node is None or node.data is None:
            raise CorruptImage(f"block map for inode {ino}, which is not a file")
        self.ns.pin(node)  # its map changes: the index no longer describes it
        return node.data, node.hashes

    def _source_maps_of(self, ino: int) -> tuple[BlockMap, BlockMap | None]:
        if isinstance(self.source_maps, IndexSourceMaps):
            raise CorruptImage("an indexed cache holds its source maps in its index")
        if ino not in self.source_maps:
            data, hashes = self._maps_of(ino)
            self.source_maps[ino] = (BlockMap(data.count),
                                     BlockMap(hashes.count) if hashes else None)
        return self.source_maps[ino]

    def _apply_run(self, run: BlockRun, maps, check_bounds: bool = True,
                   replace: bool = False) -> None:
        target = maps[0] if run.tree == TreeKind.DATA else maps[1]
        if target is None or run.first + len(run.blocks) > target.count:
            raise CorruptImage(f"block map of inode {run.ino} runs past the end of the file")
        limit = self.scan_limit()
        for index, offset, info, crc in records.run_offsets(run):
            if check_bounds:
                self._max_mapped_end = max(self._max_mapped_end, offset + info_size(info))
            if check_bounds and info_kind(info) is not BlockKind.ZERO:
                if offset < LOG_START:
                    raise CorruptImage(f"block {index} of inode {run.ino} points outside the image")
                if offset + info_size(info) > limit:
                    # cut off (a truncated or torn image): the block is absent
                    self.blocks_beyond_log += 1
                    continue
            target.set(index, offset, info, crc, replace=replace)

    def scan_limit(self) -> int:
        if self._block_limit is not None:
            return self._block_limit
        return self.scan.file_size if self.scan else os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            if self.writable and self.appender:
                os.fsync(self.fd)
            self._drop_index()
            os.close(self.fd)
            self.fd = -1
            self.plain.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- signatures ----------------------------------------------------------

    def canonical_root(self) -> bytes:
        """SHA-256 over the whole named tree: every path with its inode's
        identity, type, size, time, file id, fs-verity digest, metadata and
        symlink target, in path order. Signing this signs the namespace and,
        through the digests, every byte of every file. Once any inode has
        owners, a device number or attributes (format 1.1), the v2 root
        covers those for every inode; images without them keep the v1 root,
        so their signatures stay valid.

        An indexed image's root is the hash of its index (canonical: pack
        writes one exact byte string for a tree), as long as no later record
        changed inodes or names; after such a change it is the v2 walk, which
        can never equal an index root."""
        if isinstance(self.ns, IndexNamespace) and not self.ns.changed:
            return self.index_root()
        if self.ns.posix or isinstance(self.ns, IndexNamespace):
            return self._canonical_root_v2()
        h = hashlib.sha256(b"incfs canonical root v1\0" + self.superblock.uuid)
        for path, node in self.ns.walk():
            h.update(struct.pack("<I", len(path)) + path)
            h.update(struct.pack("<QIIQq", node.ino, node.mode, int(node.flags),
                                 node.size, node.mtime_ns))
            h.update(node.file_id + self.file_digest(node))
            h.update(struct.pack("<HH", len(node.metadata), len(node.target)))
            h.update(node.metadata + node.target)
        return h.digest()

    def _canonical_root_v2(self) -> bytes:
        h = hashlib.sha256(b"incfs canonical root v2\0" + self.superblock.uuid)
        for path, node in self.ns.walk():
            h.update(struct.pack("<I", len(path)) + path)
            h.update(struct.pack("<QIIQqIIQ", node.ino, node.mode, int(node.flags), node.size,
                                 node.mtime_ns, node.uid, node.gid, node.rdev))
            h.update(node.file_id + self.file_digest(node))
            h.update(struct.pack("<HHH", len(node.metadata), len(node.target),
                                 len(node.xattrs)))
            h.update(node.metadata + node.target)
            for name in sorted(node.xattrs):
                value = node.xattrs[name]
                h.update(struct.pack("<BI", len(name), len(value)) + name + value)
        return h.digest()

    def index_root(self) -> bytes:
        """SHA-256 over the index header and every byte of its regions; with
        CHUNKS, over the record body only (the header and the digests of the
        chunk table's pieces: every chunk is checked through them before any
        of its bytes is used), so a signed image opens in time independent
        of its size."""
        if self._index_root is None:
            head = self.index.header
            if head.chunks is not None:
                self._index_root = hashlib.sha256(b"incfs index root v2\0" + self.superblock.uuid
                                                  + self._index_body).digest()
                return self._index_root
            h = hashlib.sha256(b"incfs index root v1\0" + self.superblock.uuid
                               + self._index_body)
            first = head.regions["inodes"].offset
            last = head.regions["heap"].end
            for at in range(first, last, 1 << 22):  # pread: see check_crcs
                h.update(os.pread(self.fd, min(1 << 22, last - at), at))
            self._index_root = h.digest()
        return self._index_root

    def file_digest(self, node: Inode) -> bytes:
        if not node.has_tree:
            return bytes(32)
        return merkle.digest(node.root_hash, node.size)

    def sign(self, private_key) -> None:
        from .integrity import signing  # cryptography costs ~10 ms to import: only with keys

        root = self.canonical_root()
        alg, key_id, sig = signing.sign(private_key, root)
        entry = SignatureEntry(int(alg), key_id, root, sig)
        self._append(RecordType.SIGNATURE, records.encode_signature(entry))
        self.signature = SignatureState(entry, root)
        self.ns.mark_signed()

    def changed_since_signature(self) -> bool:
        """True when records after the signature added, removed or swapped
        names, so the tree served is not the one that was signed."""
        s = self.signature
        return s is not None and s.names_after and self.canonical_root() != s.root

    def verify_signature(self, public_key) -> None:
        """Raise IntegrityError unless the image is signed by `public_key` and
        the tree as of the signature matches what was signed."""
        if self.signature is None:
            raise IntegrityError("image is not signed")
        from .integrity import signing

        s = self.signature
        if s.root != s.entry.root:
            raise IntegrityError("namespace or file digests differ from what was signed")
        signing.verify(public_key, s.entry.algorithm, s.entry.key_id, s.root,
                       s.entry.signature)
        s.verified = True

    # --- namespace changes ---------------------------------------------------

    def _append(self, rtype: RecordType, body: bytes) -> int:
        if self.appender is None:
            raise UsageError("image is open read-only")
        offset = self.appender.append(rtype, body)
        if self.durable:
            self.appender.sync()
        return offset

    def _append_inodes(self, entries: list[InodeEntry]) -> None:
        for e in entries:
            self.ns.check_add_inode(e)
        self._append(*records.encode_inode_batch(entries))
        for e in entries:
            self.ns.add_inode(e)

    def create_node(self, parent: int, name: bytes, mode: int, *, size: int = 0,
                    file_id: bytes | None = None, metadata: bytes = b"",
                    root_hash: bytes | None = None, target: bytes = b"",
                    mtime_ns: int | None = None, uid: int = 0, gid: int = 0,
                    rdev: int = 0, xattrs: dict[bytes, bytes] | None = None) -> int:
        """Create an inode and give it its first name; returns its number."""
        if len(metadata) > records.MAX_METADATA:
            raise os_error(errno.E2BIG, "user metadata is limited to 512 bytes")
        if len(target) > records.MAX_SYMLINK:  # replay refuses longer: it would brick the image
            raise os_error(errno.ENAMETOOLONG, "a symlink target is limited to 4095 bytes")
        if file_id is not None and len(file_id) != 16:
            raise os_error(errno.EINVAL, "a file id is 16 bytes")
        if size < 0 or size > records.MAX_FILE_SIZE:
            raise os_error(errno.EFBIG, "file size out of range")
        if root_hash is not None and len(root_hash) != 32:
            raise os_error(errno.EINVAL, "a root hash is 32 bytes")
        ino = self.ns.next_ino
        entry = InodeEntry(ino, mode, size, mtime_ns if mtime_ns is not None else time.time_ns(),
                           file_id or uuidlib.uuid4().bytes, root_hash or bytes(32),
                           InodeFlags.HAS_TREE if root_hash is not None else InodeFlags(0),
                           metadata, target, uid, gid, rdev,
                           tuple(sorted((xattrs or {}).items())))
        self.ns.check_add_inode(entry)
        self._check_new_name(parent, name)
        self._append_inodes([entry])
        self.link(ino, parent, name)
        return ino

    def _check_new_name(self, parent: int, name: bytes) -> None:
        check_name(name)
        if name in self.ns.directory(parent).children:
            raise os_error(errno.EEXIST, f"{name!r} exists")

    def add_inodes(self, entries: list[InodeEntry]) -> None:
        """Add inodes in one record (pack and bulk loaders)."""
        self._append_inodes(entries)

    def add_links(self, links: list[tuple[int, int, bytes]]) -> None:
        """Give (child, parent, name) names in one record, all checked first."""
        for child, parent, name in links:
            self.ns.check_link(child, parent, name)
            self.ns.link(child, parent, name)
        entries = [DirentEntry(DirentOp.ADD, p, c, n) for c, p, n in links]
        self._append(RecordType.DIRENTS, records.encode_dirents(entries))

    def link(self, child: int, parent: int, name: bytes) -> None:
        self.ns.check_link(child, parent, name)
        entry = DirentEntry(DirentOp.ADD, parent, child, name)
        self._append(RecordType.DIRENTS, records.encode_dirents([entry]))
        self.ns.link(child, parent, name)

    def unlink(self, parent: int, name: bytes) -> None:
        node = self.ns.check_unlink(parent, name)
        entry = DirentEntry(DirentOp.REMOVE, parent, node.ino, name)
        self._append(RecordType.DIRENTS, records.encode_dirents([entry]))
        self.ns.unlink(parent, name)

    # --- summaries -------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        return self.ns.totals()


def _aligned(n: int) -> int:
    return (n + RECORD_ALIGN - 1) // RECORD_ALIGN * RECORD_ALIGN


def _open_unnamed(path: Path) -> tuple[int, Path | None]:
    """A new file under a temporary name beside `path`, or (-1, None) if none
    can be made there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
    try:
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), tmp
    except OSError:
        return -1, None


def _link_unnamed(tmp: Path, path: Path) -> None:
    """Give a complete new image its name, never over an existing file."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} already exists") from None
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _lock(fd: int, path: Path) -> None:
    """Take the image's writer lock; the caller closes `fd` if this raises."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"{path} is in use by another incfs process") from None
