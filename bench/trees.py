"""The trees the benchmark reads, built fresh (and deterministically) per run.

Local tree (`local/`):
    data/big.bin      one large file: 1 MiB chunks alternating random bytes and
                      log-like text, so LZ4/zstd have something to do (~1.6x)
    meta/dNN/fNNNN    the small-file tree for stat and `ls -R` (10,000 files)
    pkgs/             a real pure-Python package tree copied from this venv
                      (rich, pygments, markdown-it, httpx and what they
                      import), with unchecked-hash .pyc files so imports do
                      not depend on how each file system keeps mtimes
Lazy tree (`lazy/`): N files of random (incompressible) bytes, so the image
is as big as the data; a program touching X% reads X% of the files whole.
"""

from __future__ import annotations

import compileall
import os
import random
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from benchlib import MiB

PACKAGES = ["rich", "pygments", "markdown_it", "mdurl", "httpx", "httpcore", "h11", "idna",
            "anyio", "sniffio", "certifi"]
IMPORTS = ("rich.console, rich.table, rich.progress, rich.markdown, rich.syntax, "
           "rich.traceback, pygments.lexers.python, httpx")
LAZY_FILES = 100  # 1% of the image is one file


@dataclass
class LocalTree:
    root: Path
    big: str  # paths relative to root
    meta: str
    pkgs: str
    meta_paths: list[str]  # every entry under meta, relative to root
    big_size: int
    warm_pkgs: Path  # a second copy outside every tested tree, to warm the interpreter
    imports: str = IMPORTS  # what the import case imports
    check_module: str = "rich"  # must come from the tree under test


def _text_chunk(rng: random.Random, size: int, i: int) -> bytes:
    words = [b"GET", b"POST", b"/api/v1/items", b"/static/app.js", b"200", b"404", b"incfs",
             b"merkle", b"block", b"user-agent", b"curl/7.88", b"python-httpx"]
    out = bytearray()
    n = 0
    while len(out) < size:
        out += b"%d.%03d %s %s %d %s\n" % (1700000000 + i * 1000 + n, n % 1000, rng.choice(words),
                                           rng.choice(words), rng.randrange(100000),
                                           rng.choice(words))
        n += 1
    return bytes(out[:size])


def write_big(path: Path, size: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < size:
            n = min(MiB, size - written)
            f.write(rng.randbytes(n) if i % 2 == 0 else _text_chunk(rng, n, i))
            written += n
            i += 1


def write_meta(root: Path, files: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    per_dir = 100
    paths = []
    for d in range((files + per_dir - 1) // per_dir):
        dpath = root / f"d{d:03d}"
        dpath.mkdir(parents=True)
        paths.append(f"d{d:03d}")
        for k in range(min(per_dir, files - d * per_dir)):
            name = f"f{d * per_dir + k:05d}.txt"
            (dpath / name).write_bytes(rng.randbytes(rng.randrange(0, 2048)))
            paths.append(f"d{d:03d}/{name}")
    return paths


SMALL_PACKAGES = ["markdown_it", "mdurl"]  # --smoke: quick to copy and compile
SMALL_IMPORTS = "markdown_it"


def copy_packages(dest: Path, packages: list[str] = PACKAGES) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir(parents=True)
    for name in packages:
        src = site / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(str(dest), quiet=1, workers=1,
                           invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH)


def build_local(work: Path, big_size: int, meta_files: int, small_packages: bool = False) -> LocalTree:
    root = work / "local"
    if root.exists():
        shutil.rmtree(root)
    (root / "data").mkdir(parents=True)
    write_big(root / "data" / "big.bin", big_size)
    meta_paths = [f"meta/{p}" for p in write_meta(root / "meta", meta_files)]
    copy_packages(root / "pkgs", SMALL_PACKAGES if small_packages else PACKAGES)
    warm = work / "warm-pkgs"
    if warm.exists():
        shutil.rmtree(warm)
    shutil.copytree(root / "pkgs", warm)
    os.sync()
    tree = LocalTree(root, "data/big.bin", "meta", "pkgs", meta_paths, big_size, warm)
    if small_packages:
        tree.imports, tree.check_module = SMALL_IMPORTS, SMALL_PACKAGES[0]
    return tree


@dataclass
class LazyTree:
    root: Path
    files: list[str]  # relative to root, in order
    file_size: int

    def touched(self, percent: float) -> list[str]:
        """The files a program touching `percent` % of the data reads: spread
        evenly over the tree (not just its first files)."""
        count = max(1, round(len(self.files) * percent / 100))
        step = len(self.files) / count
        return [self.files[int(i * step)] for i in range(count)]


def build_lazy(work: Path, total: int, files: int = LAZY_FILES, seed: int = 23) -> LazyTree:
    root = work / "lazy-tree"
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(seed)
    size = max(4096, total // files)
    names = []
    for i in range(files):
        rel = f"part{i // 10:02d}/chunk{i:04d}.bin"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(root / rel, "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(rng.randbytes(n))
                left -= n
        names.append(rel)
    os.sync()
    return LazyTree(root, names, size)
