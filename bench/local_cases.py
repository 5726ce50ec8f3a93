"""Local (data complete) cases: every system against native ext4 reads of
the same tree, in the same run, repetitions interleaved across systems.

Cache states:
  cold    `sync; echo 3 > /proc/sys/vm/drop_caches` first (page cache,
          dentries and inodes): the disk and every layer are cold.
  warm    the data is in memory below the file system (its image file, or for
          native the file itself) but the file system's own page cache for
          the file is dropped (POSIX_FADV_DONTNEED): this is the cost of the
          file system's read path itself. For native, warm = page cache hot.
  2nd     the same reads again right away, page cache kept (a second pass).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchlib import Samples, Unavailable, drop_caches, evict_file, read_whole
from systems import System, daemon_memory, read_status
from trees import LocalTree
import workloads as w


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    unit: str
    higher_is_better: bool


CASES = [
    Case("seq_cold", "sequential 1 MiB, cold", "MB/s", True),
    Case("seq_warm", "sequential 1 MiB, warm", "MB/s", True),
    Case("seq_2nd", "sequential 1 MiB, 2nd pass", "MB/s", True),
    Case("rand_cold", "random 4 KiB, cold", "IOPS", True),
    Case("rand_warm", "random 4 KiB, warm", "IOPS", True),
    Case("rand_2nd", "random 4 KiB, 2nd pass", "IOPS", True),
    Case("stat_1st", "stat 10k files, 1st (cold)", "s", False),
    Case("stat_2nd", "stat 10k files, 2nd", "s", False),
    Case("ls_1st", "ls -R 10k files, 1st (cold)", "s", False),
    Case("ls_2nd", "ls -R 10k files, 2nd", "s", False),
    Case("import_cold", "python import, cold", "s", False),
    Case("import_2nd", "python import, 2nd", "s", False),
]


def run_cases(system: System, root: Path, tree: LocalTree, rand_ios: int, seed: int,
              record: Callable[[str, float], None], engine: str = "fio") -> None:
    big = root / tree.big
    native = system.reference

    # sequential
    drop_caches()
    record("seq_cold", w.seq_read(big))
    record("seq_2nd", w.seq_read(big))
    if not native:
        evict_file(big)  # the image below stays cached from the reads above
    record("seq_warm", w.seq_read(big))

    # random 4 KiB: the same offsets cold, then again (2nd pass), then a
    # different set with only the layer below cached (warm)
    drop_caches()
    record("rand_cold", w.rand_read(big, rand_ios, seed, engine))
    record("rand_2nd", w.rand_read(big, rand_ios, seed, engine))
    read_whole(big)
    if not native:
        evict_file(big)
    record("rand_warm", w.rand_read(big, rand_ios, seed + 1, engine))

    # metadata
    drop_caches()
    paths = tree.meta_paths
    record("stat_1st", w.stat_all(root, paths))
    record("stat_2nd", w.stat_all(root, paths))
    drop_caches()
    record("ls_1st", w.ls_recursive(root / tree.meta))
    record("ls_2nd", w.ls_recursive(root / tree.meta))

    # a real package tree
    drop_caches()
    w.warm_interpreter(tree.warm_pkgs, tree.imports, tree.check_module)
    record("import_cold", w.import_time(root / tree.pkgs, tree.imports, tree.check_module))
    record("import_2nd", w.import_time(root / tree.pkgs, tree.imports, tree.check_module))


def run_local(systems: list[System], tree: LocalTree, work: Path, reps: int, rand_ios: int,
              log: Callable[[str], None], engine: str = "fio") -> dict[str, dict[str, Samples]]:
    """results[case][system] = Samples over `reps` repetitions."""
    results: dict[str, dict[str, Samples]] = {
        c.key: {s.name: Samples(c.unit, c.higher_is_better) for s in systems} for c in CASES}
    for s in systems:
        if s.unavailable:
            continue
        try:
            log(f"  preparing {s.label}")
            s.prepare(tree.root, work)
        except Unavailable as e:
            s.unavailable = str(e)
            log(f"  {s.label}: unavailable: {e}")
    mountpoint = work / "mnt"
    for rep in range(reps):
        live = [s for s in systems if not s.unavailable]
        # rotate the order so no system always runs right after another
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for s in order:
            log(f"  rep {rep + 1}/{reps}: {s.label}")

            def record(case: str, value: float, s=s) -> None:
                results[case][s.name].values.append(value)
            try:
                with s.mounted(mountpoint) as root:
                    run_cases(s, root, tree, rand_ios, 1000 + rep, record, engine)
                    if s.daemon_pid:
                        mem = daemon_memory(s.daemon_pid)
                        mem["blocks_total"] = read_status(root).get("blocks_total", 0)
                        s.memory.append(mem)
            except Unavailable as e:
                s.unavailable = str(e)
                log(f"  {s.label}: unavailable: {e}")
            except Exception as e:  # one broken system must not sink the run
                s.failures.append(f"rep {rep + 1}: {e}")
                log(f"  {s.label}: FAILED: {e}\n{traceback.format_exc()}")
                if len(s.failures) >= 2:  # once may be bad luck; twice is a verdict
                    s.unavailable = f"failed: {e}"
    return results
