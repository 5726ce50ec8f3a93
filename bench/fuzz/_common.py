"""Shared by the atheris targets: imports incfs with coverage instrumentation,
builds seed corpora, and exercises an image the way a mount would."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

with atheris.instrument_imports(include=["incfs"]):
    import incfs.codec  # noqa: F401
    import incfs.control.server  # noqa: F401
    import incfs.control.wire  # noqa: F401
    import incfs.format.layout  # noqa: F401
    import incfs.format.log  # noqa: F401
    import incfs.format.records  # noqa: F401
    import incfs.image  # noqa: F401
    import incfs.namespace  # noqa: F401
    import incfs.service  # noqa: F401
    import incfs.testing.exercise  # noqa: F401
    import incfs.verify  # noqa: F401

from incfs import BLOCK_SIZE, ROOT_INO, codec  # noqa: E402
from incfs.errors import IncfsError  # noqa: E402
from incfs.format import records as R  # noqa: E402
from incfs.image import FillBlock, Image  # noqa: E402
from incfs.integrity import merkle  # noqa: E402

SCRATCH = Path(os.environ.get("INCFS_FUZZ_SCRATCH", "/dev/shm" if os.path.isdir("/dev/shm")
                              else "/tmp")) / f"incfs-fuzz-{os.getpid()}"
F = stat.S_IFREG | 0o444
D = stat.S_IFDIR | 0o555


def remove_stale_scratch() -> None:
    """libFuzzer ends the process without running `finally` blocks: remove
    the scratch files of earlier runs whose process is gone."""
    for path in SCRATCH.parent.glob("incfs-fuzz-*"):
        pid = path.name.removeprefix("incfs-fuzz-").split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            path.unlink(missing_ok=True)


def corpus_dir(name: str) -> Path:
    remove_stale_scratch()
    path = Path(os.environ.get("INCFS_FUZZ_CORPUS", "/tmp/incfs-fuzz-corpus")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean(e: BaseException) -> None:
    """The documented failures: our errors, or an OSError with an errno."""
    if isinstance(e, IncfsError):
        return
    if isinstance(e, OSError) and e.errno:
        return
    raise e


def live_image(path: Path) -> bytes:
    """A small image filled the way a loader fills one (every block kind)."""
    path.unlink(missing_ok=True)
    img = Image.create(path)
    img.durable = False
    d = img.create_node(ROOT_INO, b"dir", D)
    data = (b"compressible text " * 400)[:5 * BLOCK_SIZE - 100] + bytes(range(256)) * 16
    data += bytes(2 * BLOCK_SIZE) + b"tail" * 100
    root, tree = merkle.tree_of_bytes(data)
    ino = img.create_node(d, b"file", F, size=len(data), root_hash=root)
    img.fill(ino, [FillBlock(i, b, tree=R.TreeKind.HASH) for i, b in enumerate(tree)])
    kinds = [R.BlockKind.RAW, R.BlockKind.LZ4, R.BlockKind.ZSTD]
    for i in range(merkle.block_count(len(data))):
        kind, stored = codec.compress(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], kinds[i % 3])
        img.fill(ino, [FillBlock(i, stored, kind)])
    plain = img.create_node(ROOT_INO, b"plain", F, size=2 * BLOCK_SIZE + 5)
    img.fill(plain, [FillBlock(0, b"p" * BLOCK_SIZE), FillBlock(2, b"t" * 5)])
    img.link(ino, ROOT_INO, b"hardlink")
    img.create_node(ROOT_INO, b"sym", stat.S_IFLNK | 0o777, size=4, target=b"dir/")
    img.create_node(ROOT_INO, b"gone", F, size=1)
    img.unlink(ROOT_INO, b"gone")
    img.close()
    return path.read_bytes()


def exercise_image(path: Path, verify: bool = False) -> None:
    from incfs.testing.exercise import exercise_image as exercise

    exercise(path, clean, files=200, blocks_per_file=32, verify=verify)


def run(test_one_input, corpus: Path, scratch: Path | None = None) -> None:
    """Start atheris on a target with its seed corpus (unless the command
    line names one); remove the target's scratch file afterwards."""
    import sys

    given = any(not a.startswith("-") for a in sys.argv[1:])
    argv = sys.argv + ([] if given else [str(corpus)])
    try:
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
