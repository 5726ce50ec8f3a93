"""Checking and describing a backing image: the library behind `incfs verify`,
`incfs inspect` and `incfs digest`.

`verify_image` opens an image read-only and checks everything it holds: the
log (torn or dropped tail), the signature, every present hash-tree block and
data block of every file (CRC, decoding and the Merkle tree, exactly as a
read would), and whether files are complete. It never stops at the first
problem: the report names each one (file path, which tree, which block
indexes, what is wrong) so a damaged image can be judged at a glance.

Two kinds of failure are kept apart, because callers act on them
differently:

* integrity failures are findings about the image (`Problem` entries with
  severity INTEGRITY; `VerifyReport.exit_code` 1);
* usage and I/O errors mean the check could not be done (a missing file, a
  file that is not an incfs image, an unreadable key): `verify_image` raises
  `UsageError` or `OSError` for those before checking anything, and an I/O
  error while reading a block becomes a Problem with severity IO (exit 2
  unless an integrity failure was also found).
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import BLOCK_SIZE, ROOT_INO, codec
from .errors import CorruptImage, IntegrityError, UsageError
from .format import layout
from .format.index import IndexDamage
from .format.layout import SuperFlags
from .format.records import BlockKind, TreeKind, info_kind, info_size
from .image import Image, MissingBlock
from .integrity import merkle, signing
from .namespace import Inode

# Called with (blocks checked so far, blocks to check in all).
VerifyProgress = Callable[[int, int], None]

INTEGRITY = "integrity"  # the image is damaged, tampered with or incomplete
IO = "io"  # a read failed: the check could not be done
NOTE = "note"  # worth knowing, not a failure

MAX_PROBLEMS = 1000  # findings kept in a report; the rest are only counted
MAX_UNSIGNED_LISTED = 20
PROGRESS_EVERY = 1024

ALGORITHM_LABELS = {signing.Algorithm.ED25519: "ed25519",
                    signing.Algorithm.ECDSA_P256: "ecdsa-p256",
                    signing.Algorithm.RSA_PSS: "rsa"}


@dataclass
class Problem:
    """One finding. `path` is the file's path inside the image (None for
    image-wide findings); `tree` is "data" or "hash"; `first`..`last` is the
    inclusive range of block indexes (storage indexes for the hash tree)."""

    severity: str
    message: str
    path: str | None = None
    tree: str | None = None
    first: int | None = None
    last: int | None = None
    aliases: list[str] = field(default_factory=list)  # the file's other names

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path + (f" (also {', '.join(self.aliases)})"
                                      if self.aliases else ""))
        if self.tree is not None and self.first is not None:
            if self.last is None or self.last == self.first:
                where.append(f"{self.tree} block {self.first}")
            else:
                where.append(f"{self.tree} blocks {self.first}-{self.last}")
        return ": ".join(where + [self.message])


@dataclass
class VerifyReport:
    image: str
    packed: bool = False
    version: str = ""
    file_size: int = 0
    records: int = 0
    dropped_bytes: int = 0
    dropped_reason: str = ""
    skipped_unknown: list[int] = field(default_factory=list)
    signed: bool = False
    signature_algorithm: str | None = None
    signature_key_id: str | None = None
    signature_verified: bool | None = None  # None: no key was given
    files: int = 0
    files_complete: int = 0
    data_blocks_total: int = 0
    data_blocks_present: int = 0
    hash_blocks_total: int = 0
    hash_blocks_present: int = 0
    blocks_checked: int = 0
    integrity_failures: int = 0
    io_errors: int = 0
    problems: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0  # findings counted but not listed (MAX_PROBLEMS)

    # --- outcome --------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.files_complete == self.files

    @property
    def ok(self) -> bool:
        return not self.integrity_failures and not self.io_errors

    @property
    def exit_code(self) -> int:
        """0 good, 1 integrity failure, 2 an I/O error kept the check from
        finishing (and nothing wrong was found in what could be read)."""
        if self.integrity_failures:
            return 1
        return 2 if self.io_errors else 0

    def add(self, problem: Problem) -> None:
        if problem.severity == INTEGRITY:
            self.integrity_failures += 1
        elif problem.severity == IO:
            self.io_errors += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.problems_omitted += 1

    def to_dict(self) -> dict:
        out = asdict(self)
        out["problems"] = [dict(asdict(p), text=str(p)) for p in self.problems]
        out.update(ok=self.ok, complete=self.complete, exit_code=self.exit_code)
        return out

    def summary(self) -> str:
        """One line: the verdict and the counts behind it."""
        if self.integrity_failures:
            verdict = f"FAILED: {self.integrity_failures} integrity problem(s)"
        elif self.io_errors:
            verdict = f"UNVERIFIED: {self.io_errors} I/O error(s)"
        else:
            verdict = "OK"
        if self.signature_verified:
            sig = f"signed ({self.signature_algorithm}, key {self.signature_key_id[:16]}) and verified"
        elif self.signed:
            sig = f"signed ({self.signature_algorithm}, key {self.signature_key_id[:16]})"
            sig += ", signature not checked" if self.signature_verified is None else ", signature BAD"
        else:
            sig = "unsigned"
        blocks = self.data_blocks_present + self.hash_blocks_present
        total = self.data_blocks_total + self.hash_blocks_total
        return (f"{verdict} - {self.files} files ({self.files_complete} complete), "
                f"{self.blocks_checked} of {blocks} present blocks checked "
                f"({total} in all), {sig}")


# --- helpers shared by verify, inspect and digest ------------------------------

def display_path(path: bytes) -> str:
    """A path from the image as printable text (non-UTF-8 bytes escaped)."""
    return path.decode("utf-8", "backslashreplace") if path else "/"


def check_is_image(path: str | os.PathLike) -> None:
    """Raise UsageError unless `path` is a regular file that starts like an
    incfs image of a format version this code reads. Integrity of the rest
    is left to opening and verifying."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < 12 or head[:8] != layout.MAGIC:
        raise UsageError(f"{path} is not an incfs image")
    major, minor = struct.unpack_from("<HH", head, 8)
    if major != layout.VERSION_MAJOR:
        raise UsageError(f"{path} has format version {major}.{minor}; this incfs "
                         f"reads version {layout.VERSION_MAJOR}.x")


def open_image(path: str | os.PathLike) -> Image:
    """Open an image read-only after checking it is one (UsageError if not)."""
    check_is_image(path)
    return Image.open(path)


def resolve(img: Image, path: str | bytes) -> tuple[bytes, Inode]:
    """The inode at `path` inside the image (symlinks are not followed)."""
    raw = os.fsencode(path)
    node = img.ns.get(ROOT_INO)
    walked = b""
    for part in raw.split(b"/"):
        if not part:
            continue
        if not node.is_dir:
            raise UsageError(f"{display_path(walked)} is not a directory in the image")
        child = node.children.get(part)
        if child is None:
            raise UsageError(f"{display_path(walked + b'/' + part)}: no such entry in the image")
        walked += b"/" + part
        node = img.ns.inodes[child]
    return walked, node


def file_digest(img: Image, node: Inode) -> bytes:
    """The fs-verity digest of a regular file. From its stored root hash when
    it has a Merkle tree, else computed from its blocks (which must all be
    present)."""
    if not node.is_reg:
        raise UsageError("only regular files have an fs-verity digest")
    if node.has_tree:
        return merkle.digest(node.root_hash, node.size)
    hashes = []
    for i in range(node.data.count):
        try:
            hashes.append(merkle.hash_block(img.read_block(node, i)))
        except MissingBlock:
            raise UsageError(f"block {i} is absent and the file has no Merkle tree; "
                             "its digest is not known yet") from None
    root, _ = merkle.build_tree(hashes, node.size)
    return merkle.digest(root, node.size)


def digest_of(image_path: str | os.PathLike, path: str | bytes) -> str:
    """`sha256:<hex>`, the fs-verity digest of `path` inside the image."""
    with open_image(image_path) as img:
        shown, node = resolve(img, path)
        if not node.is_reg:
            raise UsageError(f"{display_path(shown)} is not a regular file")
        return "sha256:" + file_digest(img, node).hex()


def unique_files(img: Image) -> Iterator[tuple[list[bytes], Inode]]:
    """(its paths, inode) for every named regular file: hard links once, with
    all their names (in walk order)."""
    names: dict[int, list[bytes]] = {}
    for path, node in img.ns.walk():
        if node.data is not None:
            names.setdefault(node.ino, []).append(path)
    for ino, paths in names.items():
        yield paths, img.ns.inodes[ino]


# --- verify --------------------------------------------------------------------

def verify_image(path: str | os.PathLike, public_key_path: str | os.PathLike | None = None,
                 allow_unsigned: bool = True,
                 progress: VerifyProgress | None = None) -> VerifyReport:
    """Check everything in the image at `path`; see the module docstring.

    With `public_key_path`, the image must be signed by that key and the
    namespace must still be what was signed. Without it, a signature is
    reported (and its stored root checked against the namespace) but not
    verified, and an unsigned image is a failure only if `allow_unsigned`
    is False.
    """
    public_key = signing.load_public(public_key_path) if public_key_path else None
    check_is_image(path)
    report = VerifyReport(image=str(path))
    try:
        img = Image.open(path)
    except CorruptImage as e:
        report.add(Problem(INTEGRITY, f"image cannot be opened: {e}"))
        return report
    with img:
        _check_log(img, report)
        _check_index_chunks(img, report)
        try:
            _check_signature(img, report, public_key, allow_unsigned)
            _check_blocks(img, report, progress)
        except IndexDamage as e:  # an index is checked as it is read
            report.add(Problem(INTEGRITY, str(e)))
    return report


def _check_index_chunks(img: Image, report: VerifyReport) -> None:
    """Every chunk of the index against its digest, reachable from the tree
    or not (a mount checks each one when it is first read)."""
    if img.index is None:
        return
    check = img.index.check
    for c in check.all():
        start, stop = check.bounds(c)
        report.add(Problem(INTEGRITY, f"index chunk {c} (bytes {start}..{stop} of the image) "
                                      "does not match its digest"))


def _check_log(img: Image, report: VerifyReport) -> None:
    sb, scan = img.superblock, img.scan
    report.packed = bool(sb.flags & SuperFlags.PACKED)
    report.version = f"{sb.version_major}.{sb.version_minor}"
    report.file_size = scan.file_size
    report.records = scan.records
    report.dropped_bytes = scan.dropped_bytes
    report.dropped_reason = scan.dropped_reason
    report.skipped_unknown = list(scan.skipped_unknown)
    if scan.dropped_bytes:
        report.add(Problem(NOTE, f"log: {scan.dropped_bytes} bytes after the last good record "
                                 f"(which ends at offset {scan.end}) were dropped: "
                                 f"{scan.dropped_reason}"))
    if scan.skipped_unknown:
        kinds = ", ".join(f"{t:#x}" for t in sorted(set(scan.skipped_unknown)))
        report.add(Problem(NOTE, f"log: skipped {len(scan.skipped_unknown)} record(s) of "
                                 f"unknown optional type(s) {kinds}"))
    if img.blocks_beyond_log:
        report.add(Problem(NOTE, f"log: {img.blocks_beyond_log} mapped block(s) lie past the "
                                 "end of the good log and count as absent"))
    if report.packed and sb.packed_size:
        if scan.file_size < sb.packed_size:
            report.add(Problem(INTEGRITY, f"image is truncated: {scan.file_size} of "
                                          f"{sb.packed_size} bytes written by pack"))
        elif scan.file_size > sb.packed_size:
            report.add(Problem(NOTE, f"{scan.file_size - sb.packed_size} bytes follow the "
                                     "packed image (appended after packing)"))


def _check_signature(img: Image, report: VerifyReport, public_key,
                     allow_unsigned: bool) -> None:
    state = img.signature
    if state is None:
        if public_key is not None or not allow_unsigned:
            report.add(Problem(INTEGRITY, "image is not signed"))
        else:
            report.add(Problem(NOTE, "image is not signed"))
        return
    entry = state.entry
    report.signed = True
    report.signature_algorithm = _algorithm_label(entry.algorithm)
    report.signature_key_id = entry.key_id.hex()
    if public_key is not None:
        try:
            img.verify_signature(public_key)
        except IntegrityError as e:
            report.signature_verified = False
            report.add(Problem(INTEGRITY, f"signature: {e}"))
        else:
            report.signature_verified = True
    elif state.root != entry.root:
        report.add(Problem(INTEGRITY, "signature: namespace or file digests differ from "
                                      "what was signed"))
    _check_after_signature(img, report, state, strict=public_key is not None)


def _check_after_signature(img: Image, report: VerifyReport, state, strict: bool) -> None:
    """Records after the signature may add or remove names the signature does
    not cover; with a key that is a failure, without one a note."""
    if img.canonical_root() == state.root:
        return
    severity = INTEGRITY if strict else NOTE
    unsigned = [(p, n) for p, n in img.ns.walk() if not n.signed]
    for path, _node in unsigned[:MAX_UNSIGNED_LISTED]:
        report.add(Problem(severity, "added after the image was signed: not covered by "
                                     "the signature", path=display_path(path)))
    if len(unsigned) > MAX_UNSIGNED_LISTED:
        report.add(Problem(severity, f"{len(unsigned) - MAX_UNSIGNED_LISTED} more entries "
                                     "were added after signing"))
    if not unsigned:
        report.add(Problem(severity, "names were changed after the image was signed: "
                                     "the tree differs from what the signature covers"))


def _algorithm_label(value: int) -> str:
    try:
        return ALGORITHM_LABELS[signing.Algorithm(value)]
    except ValueError:
        return f"unknown({value})"


class _Ranges:
    """Collects per-block findings of one file and merges neighbours with the
    same severity and message into one ranged Problem."""

    def __init__(self, report: VerifyReport, path: str, aliases: list[str]):
        self.report, self.path, self.aliases = report, path, aliases
        self.open: tuple[str, str, str, int, int] | None = None

    def add(self, severity: str, tree: str, index: int, message: str) -> None:
        self.add_span(severity, tree, index, index, message)

    def add_span(self, severity: str, tree: str, first: int, last: int, message: str) -> None:
        cur = self.open
        if cur and cur[0] == severity and cur[1] == tree and cur[2] == message \
                and cur[4] + 1 == first:
            self.open = (severity, tree, message, cur[3], last)
            return
        self.flush()
        self.open = (severity, tree, message, first, last)

    def flush(self) -> None:
        if self.open:
            severity, tree, message, first, last = self.open
            self.report.add(Problem(severity, message, self.path, tree, first, last,
                                    list(self.aliases)))
            self.open = None


def _check_blocks(img: Image, report: VerifyReport, progress: VerifyProgress | None) -> None:
    files = list(unique_files(img))
    total = 0
    for _, node in files:
        report.files += 1
        report.data_blocks_total += node.data.count
        report.data_blocks_present += node.data.present
        if node.hashes is not None:
            report.hash_blocks_total += node.hashes.count
            report.hash_blocks_present += node.hashes.present
        total += node.data.present + (node.hashes.present if node.hashes else 0)
    missing_severity = INTEGRITY if report.packed else NOTE
    missing_why = ("absent (a packed image holds every block: truncated or damaged)"
                   if report.packed else "absent (not filled yet)")
    tick = _Ticker(progress, total)
    for paths, node in files:
        shown = display_path(paths[0])
        aliases = [display_path(p) for p in paths[1:]]
        if node.complete:
            report.files_complete += 1
        ranges = _Ranges(report, shown, aliases)
        bad_hash: dict[int, str] = {}
        if node.has_tree:
            for s in _present_or_span(node.hashes, ranges, missing_severity, "hash", missing_why):
                finding = _check_hash_block(img, node, s, bad_hash, missing_severity)
                if finding:
                    ranges.add(finding[0], "hash", s, finding[1])
                report.blocks_checked += 1
                tick.step()
        elif node.data.count and report.signed:
            severity = INTEGRITY if report.signature_verified is not None else NOTE
            report.add(Problem(severity, "file has no Merkle tree: its content is not covered "
                                         "by the signature (blocks checked by CRC only)", shown,
                               aliases=aliases))
        for i in _present_or_span(node.data, ranges, missing_severity, "data", missing_why):
            finding = _check_data_block(img, node, i, bad_hash, missing_severity)
            if finding:
                ranges.add(finding[0], "data", i, finding[1])
            report.blocks_checked += 1
            tick.step()
        ranges.flush()
    tick.done()


def _present_or_span(bmap, ranges: "_Ranges", severity: str, tree: str,
                     why: str) -> Iterator[int]:
    """Yield the present block indexes in order and report each run of absent
    ones as one span: work follows the blocks stored, not the file's declared
    size (a hostile image may claim 2^63 bytes; counting to that is a hang)."""
    pos = 0
    for start, stop in bmap.ranges():
        if start > pos:
            ranges.add_span(severity, tree, pos, start - 1, why)
        yield from range(start, stop)
        pos = stop
    if pos < bmap.count:
        ranges.add_span(severity, tree, pos, bmap.count - 1, why)


def _check_hash_block(img: Image, node: Inode, s: int, bad_hash: dict[int, str],
                      absent: str):
    """None when hash block `s` verifies, else (severity, what is wrong).
    `absent` is the severity of "a hash block it needs is absent"."""
    level, index = node.geometry.level_of(s)
    if level + 1 < node.geometry.levels:
        parent, _ = node.geometry.locate(level, index)
        if parent in bad_hash:
            bad_hash[s] = "parent"
            return INTEGRITY, f"cannot be verified: hash block {parent} above it is damaged"
        if not node.hashes.is_present(parent):
            bad_hash[s] = "parent"
            return absent, f"cannot be verified: hash block {parent} above it is absent"
    try:
        img.hash_block(node, s)
    except IntegrityError:
        why = _diagnose(img, node, TreeKind.HASH, s)
        bad_hash[s] = why
        return INTEGRITY, why
    except MissingBlock as e:
        bad_hash[s] = "parent"
        return absent, f"cannot be verified: hash block {e.index} above it is absent"
    except OSError as e:
        bad_hash[s] = "io"
        return IO, f"read failed: {e.strerror or e}"
    return None


def _check_data_block(img: Image, node: Inode, i: int, bad_hash: dict[int, str],
                      absent: str):
    """None when data block `i` reads back verified, else (severity, why)."""
    if node.has_tree:
        for s in merkle.required_hash_blocks(node.geometry, i):
            if s in bad_hash:
                return INTEGRITY, f"cannot be verified: hash block {s} above it is damaged"
            if not node.hashes.is_present(s):
                return absent, f"cannot be verified: hash block {s} above it is absent"
    try:
        img.read_block(node, i)
    except IntegrityError:
        return INTEGRITY, _diagnose(img, node, TreeKind.DATA, i)
    except MissingBlock as e:
        return absent, f"cannot be verified: {e.tree.name.lower()} block {e.index} is absent"
    except OSError as e:
        return IO, f"read failed: {e.strerror or e}"
    return None


def _diagnose(img: Image, node: Inode, tree: TreeKind, index: int) -> str:
    """Say what is wrong with a block that failed to read back verified."""
    blocks = node.data if tree == TreeKind.DATA else node.hashes
    offset, info, crc = blocks.get(index)
    kind = info_kind(info)
    where = f"{kind.name.lower()} block at offset {offset}"
    if kind is BlockKind.ZERO:
        return "an all-zero block does not match the Merkle tree"
    stored = img.stored_bytes(node, offset, info_size(info))
    if len(stored) != info_size(info):
        return f"{where}: only {len(stored)} of {info_size(info)} stored bytes are in the file"
    if crc is not None and zlib.crc32(stored) != crc:
        return f"{where}: stored bytes fail their CRC32"
    size = BLOCK_SIZE if tree == TreeKind.HASH else min(BLOCK_SIZE, node.size - index * BLOCK_SIZE)
    try:
        codec.decompress(kind, stored, size)
    except CorruptImage as e:
        return f"{where}: {e}"
    return f"{where}: content does not match the file's Merkle tree (SHA-256 mismatch)"


class _Ticker:
    def __init__(self, progress: VerifyProgress | None, total: int):
        self.progress, self.total, self.count = progress, total, 0
        if progress:
            progress(0, total)

    def step(self) -> None:
        self.count += 1
        if self.progress and self.count % PROGRESS_EVERY == 0:
            self.progress(self.count, self.total)

    def done(self) -> None:
        if self.progress:
            self.progress(self.count, self.total)


# --- inspect -------------------------------------------------------------------

def _describe_index(img: Image) -> dict | None:
    """The compact index's size, features and chunks (None: a log image)."""
    if img.index is None:
        return None
    from .format.index import COMPAT_DTYPES
    from .format.index_chunks import INCOMPAT_CHUNKS
    from .format.maps import INCOMPAT_MAP_KINDS

    head, check = img.index.header, img.index.check
    names = [name for bit, name, word in ((COMPAT_DTYPES, "dtypes", head.compat),
                                          (INCOMPAT_MAP_KINDS, "map_kinds", head.incompat),
                                          (INCOMPAT_CHUNKS, "chunks", head.incompat))
             if word & bit]
    chunked = head.chunks is not None
    return {"inodes": head.inode_count, "bytes": check.end - check.base, "features": names,
            "chunk_size": 1 << check.shift if chunked else None,
            "chunks": len(check.state) if chunked else None}


def describe_image(path: str | os.PathLike, max_entries: int = 100) -> dict:
    """A machine-readable summary of an image: superblock, counts, blocks,
    stored bytes, compression mix, signature, recovery report and the first
    `max_entries` entries of the tree (all of them for small images)."""
    with open_image(path) as img:
        sb, scan = img.superblock, img.scan
        counts = {"files": 0, "directories": 0, "symlinks": 0, "devices": 0, "fifos": 0,
                  "sockets": 0, "with_xattrs": 0, "inodes": len(img.ns), "unnamed": 0}
        blocks = {"data_total": 0, "data_present": 0, "hash_total": 0, "hash_present": 0}
        mix = {kind.name.lower(): {"blocks": 0, "stored_bytes": 0} for kind in BlockKind}
        file_bytes = 0
        complete_files = 0
        offsets: dict[int, int] = {}
        for node in img.ns.inodes.values():
            counts[_COUNTED[_kind(node)]] += 1
            counts["with_xattrs"] += bool(node.xattrs)
            if node.nlink == 0 and node.ino != ROOT_INO:
                counts["unnamed"] += 1
            if node.data is None:
                continue
            file_bytes += node.size
            complete_files += node.complete
            for tree, bmap in (("data", node.data), ("hash", node.hashes)):
                if bmap is None:
                    continue
                blocks[f"{tree}_total"] += bmap.count
                blocks[f"{tree}_present"] += bmap.present
                for _i, offset, info, _crc in bmap.entries():
                    kind = info_kind(info)
                    slot = mix[kind.name.lower()]
                    slot["blocks"] += 1
                    if kind is not BlockKind.ZERO and offset not in offsets:
                        offsets[offset] = info_size(info)
                        slot["stored_bytes"] += info_size(info)
        blocks["total"] = blocks["data_total"] + blocks["hash_total"]
        blocks["present"] = blocks["data_present"] + blocks["hash_present"]
        signature = None
        if img.signature is not None:
            e = img.signature.entry
            signature = {"algorithm": _algorithm_label(e.algorithm), "key_id": e.key_id.hex(),
                         "root": e.root.hex(),
                         "root_matches_namespace": img.signature.root == e.root,
                         "signature_bytes": len(e.signature)}
        # every name, plus the root itself
        entries_total = 1 + sum(len(n.children) for n in img.ns.inodes.values() if n.is_dir)
        tree = []
        for n, (p, node) in enumerate(img.ns.walk()):
            if n >= max_entries:
                break
            tree.append(_describe_entry(p, node))
        return {
            "image": str(path),
            "format_version": f"{sb.version_major}.{sb.version_minor}",
            "superblock": {
                "magic": layout.MAGIC.decode(), "version_major": sb.version_major,
                "version_minor": sb.version_minor, "block_size": BLOCK_SIZE,
                "hash_algorithm": "sha256", "flags": int(sb.flags),
                "flag_names": [f.name.lower() for f in SuperFlags if sb.flags & f],
                "uuid": sb.uuid.hex(), "meta_end": sb.meta_end, "data_start": sb.data_start,
                "data_end": sb.data_end, "packed_size": sb.packed_size,
            },
            "file_size": scan.file_size,
            "counts": counts,
            "file_bytes": file_bytes,
            "complete_files": complete_files,
            "complete": complete_files == counts["files"],
            "blocks": blocks,
            "stored_bytes": sum(offsets.values()),
            "compression": mix,
            "signature": signature,
            "recovery": {
                "records": scan.records, "log_end": scan.end,
                "last_record": scan.last_record, "dropped_bytes": scan.dropped_bytes,
                "dropped_reason": scan.dropped_reason,
                "skipped_unknown_types": sorted(set(scan.skipped_unknown)),
                "blocks_beyond_log": img.blocks_beyond_log,
                "clean": not scan.dropped_bytes,
            },
            "index": _describe_index(img),
            "entries_total": entries_total,
            "tree": tree,
            "tree_truncated": entries_total > len(tree),
        }


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}
_COUNTED = {"dir": "directories", "file": "files", "symlink": "symlinks", "chardev": "devices",
            "blockdev": "devices", "fifo": "fifos", "socket": "sockets"}


def _kind(node: Inode) -> str:
    return _KINDS[stat.S_IFMT(node.mode)]


def _describe_entry(path: bytes, node: Inode) -> dict:
    out = {"path": display_path(path), "type": _kind(node), "ino": node.ino,
           "mode": f"{stat.S_IMODE(node.mode):04o}", "uid": node.uid, "gid": node.gid,
           "nlink": node.nlink, "size": node.size}
    if node.is_device:
        out["rdev"] = [os.major(node.rdev), os.minor(node.rdev)]
    if node.xattrs:
        out["xattrs"] = {name.decode("utf-8", "backslashreplace"): _xattr_text(value)
                         for name, value in sorted(node.xattrs.items())}
    if node.data is not None:
        present = node.data.present + (node.hashes.present if node.hashes else 0)
        total = node.data.count + (node.hashes.count if node.hashes else 0)
        out.update(blocks_present=present, blocks_total=total, complete=node.complete)
    if node.target:
        out["target"] = node.target.decode("utf-8", "backslashreplace")
    return out


def _xattr_text(value: bytes) -> str:
    """A value as `getfattr` shows it: text when it is printable, else hex."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    return text if text.isprintable() else "0x" + value.hex()
