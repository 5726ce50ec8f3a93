"""The benchmark machinery works: `bench/run.py --smoke` (a few MiB, one
repetition, local cases plus one lazy case) writes a JSON with the expected
keys and positive numbers, and a chart. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL_CASES = {"seq_cold", "seq_warm", "seq_2nd", "rand_cold", "rand_warm", "rand_2nd",
               "stat_1st", "stat_2nd", "ls_1st", "ls_2nd", "import_cold", "import_2nd"}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root (drop_caches, mounts)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke",
                           "--out", str(out), "--work", str(out / "work")],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "smoke.json").read_text())
    doc["_out"] = str(out)
    doc["_stdout"] = proc.stdout
    return doc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x) and x > 0


def test_document_shape(smoke):
    for key in ("meta", "reference", "local_systems", "local", "lazy", "targets"):
        assert key in smoke
    assert smoke["meta"]["mode"] == "smoke"
    for key in ("nproc", "mem_gib", "kernel"):
        assert key in smoke["meta"]["machine"]
    assert set(smoke["local"]) == LOCAL_CASES
    assert Path(smoke["_out"], "smoke.png").stat().st_size > 0
    assert not (Path(smoke["_out"]) / "work").exists()  # scratch space cleaned up


def test_local_numbers_are_positive(smoke):
    systems = smoke["local_systems"]
    assert systems["native"]["available"]
    assert any(systems[n]["available"] for n in ("incfs-raw", "incfs-lz4", "incfs-zstd"))
    for case, body in smoke["local"].items():
        assert body["unit"] in ("MB/s", "IOPS", "s")
        for name, cell in body["systems"].items():
            if not systems[name]["available"]:
                assert systems[name].get("unavailable"), f"{name} gives no reason"
                continue
            assert cell["values"] and all(_positive(v) for v in cell["values"]), (case, name, cell)
            assert _positive(cell["ratio"]), (case, name, cell)
    native = smoke["local"]["seq_cold"]["systems"]["native"]
    assert native["ratio"] == pytest.approx(1.0)


def test_lazy_case(smoke):
    lazy = smoke["lazy"]
    assert lazy, "no lazy link in the document"
    for link, body in lazy.items():
        if body.get("unavailable"):
            continue  # no network namespaces here: the reason is recorded
        assert _positive(body["image_bytes"])
        for case, c in body["cases"].items():
            download = c["approaches"]["download"]
            assert _positive(download["median"]), (case, download)
            inc = body["approaches"]["incfs"]
            if inc.get("unavailable"):
                assert inc["unavailable"]  # says why (e.g. the loader is not there yet)
                continue
            cell = c["approaches"]["incfs"]
            assert _positive(cell["median"]) and _positive(cell["vs_download"]), (case, cell)
            if case.startswith("touch"):
                assert _positive(cell["amplification"]), cell


def test_targets_and_table(smoke):
    assert smoke["targets"], "no DESIGN.md target evaluated"
    for t in smoke["targets"]:
        assert set(t) == {"target", "measured", "verdict"}
    assert "Local, data complete" in smoke["_stdout"]
    assert "DESIGN.md targets" in smoke["_stdout"]
