"""`make demo` end to end: pack, serve, lazy mount, run while streaming,
complete, offline remount. Runs the same module the Makefile runs."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "incfs.demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "hello from incfs" in out
    assert "before the download ended" in out
    assert "complete: True, fetched this time: 0 bytes" in out
    assert "works offline" in out
    assert "data blocks present" in out  # the presence picture, early and complete
    assert (tmp_path / ".demo" / "presence-complete.png").read_bytes()[:4] == b"\x89PNG"
    assert not os.path.ismount(tmp_path / ".demo" / "mnt")
