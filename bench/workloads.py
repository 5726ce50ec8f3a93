"""What a case does on a mounted tree; each returns one number.

Throughputs are MB/s or IOPS (higher is better), the rest seconds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from benchlib import PYTHON, MiB, Timer, which
from trees import IMPORTS


def seq_read(path: Path) -> float:
    """Sequential 1 MiB reads of the whole file: MB/s."""
    with Timer() as t:
        n = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                b = os.read(fd, MiB)
                if not b:
                    break
                n += len(b)
        finally:
            os.close(fd)
    return n / t.seconds / 1e6


def rand_read(path: Path, ios: int, seed: int, engine: str = "fio") -> float:
    """Random 4 KiB reads, one at a time (psync), buffered: IOPS.

    fio when installed (its job hints POSIX_FADV_RANDOM, so no readahead),
    otherwise a Python pread loop with the same hint."""
    if engine == "fio" and which("fio"):
        return _fio_rand(path, ios, seed)
    return _py_rand(path, ios, seed)


def _fio_rand(path: Path, ios: int, seed: int) -> float:
    size = os.stat(path).st_size
    out = subprocess.run(
        ["fio", "--name=rand4k", f"--filename={path}", "--readonly", "--rw=randread", "--bs=4k",
         "--ioengine=psync", "--direct=0", "--invalidate=0", f"--size={size}",
         f"--number_ios={ios}", "--randrepeat=0", f"--randseed={seed}", "--norandommap",
         "--output-format=json"],
        capture_output=True, text=True, check=True, timeout=600)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
    if job["io_bytes"] <= 0 or job["runtime"] <= 0:
        raise RuntimeError(f"fio did no I/O on {path}")
    # per-I/O latency (ns) is finer than fio's millisecond runtime
    lat = (job.get("lat_ns") or {}).get("mean")
    return 1e9 / lat if lat else job["iops"]


def _py_rand(path: Path, ios: int, seed: int) -> float:
    size = os.stat(path).st_size
    rng = random.Random(seed)
    blocks = size // 4096
    offsets = [rng.randrange(blocks) * 4096 for _ in range(ios)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with Timer() as t:
            for off in offsets:
                os.pread(fd, 4096, off)
    finally:
        os.close(fd)
    return ios / t.seconds


def stat_all(root: Path, rel_paths: list[str]) -> float:
    """lstat() of every entry of the small-file tree: seconds."""
    prefix = str(root) + "/"
    lstat = os.lstat
    with Timer() as t:
        for p in rel_paths:
            lstat(prefix + p)
    return t.seconds


def ls_recursive(directory: Path) -> float:
    """`ls -R DIR > /dev/null`: seconds (includes starting ls, ~1 ms)."""
    with Timer() as t:
        subprocess.run(["ls", "-R", str(directory)], stdout=subprocess.DEVNULL, check=True,
                       timeout=600)
    return t.seconds


_IMPORT_CODE = (
    "import importlib, sys, time\n"
    "t = time.perf_counter()\n"
    "import {imports}\n"
    "dt = time.perf_counter() - t\n"
    "m = importlib.import_module('{check}')\n"
    "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
    "print(dt)\n"
)


def import_time(pkgs: Path, imports: str = IMPORTS, check: str = "rich") -> float:
    """Seconds for `import rich..., httpx` with PYTHONPATH in `pkgs` (timed
    inside the interpreter; -S keeps the venv's own copies out of sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(pkgs), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONHOME", None)
    code = _IMPORT_CODE.format(imports=imports, check=check)
    out = subprocess.run([PYTHON, "-S", "-c", code, str(pkgs)], capture_output=True,
                         text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"import from {pkgs} failed: {out.stderr.strip()[-400:]}")
    return float(out.stdout.strip().splitlines()[-1])


def warm_interpreter(warm_pkgs: Path, imports: str = IMPORTS, check: str = "rich") -> None:
    """After dropping caches: load the interpreter and the standard library
    again (from a copy of the packages outside the tree under test), so a
    cold import measures the file system holding the packages."""
    import_time(warm_pkgs, imports, check)
