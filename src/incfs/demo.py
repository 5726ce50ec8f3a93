"""`make demo`: the main job end to end on an embedded sample.

1. build a sample application tree (a Python program, its package, 48 MiB of data);
2. make a signing key and pack the tree into a signed, zstd-compressed image;
3. serve the image over local HTTP through a link that adds latency and caps
   bandwidth, so the streaming can be seen;
4. mount it lazily, run the program from the mount at once while the rest of
   the image streams in, with a progress bar;
5. print the final status (bytes the program read vs bytes fetched) and
   unmount. Everything lives under .demo/ and is rebuilt each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from . import presence
from .cli_mount import format_status, read_status, watch_status
from .integrity.signing import ALGORITHM_NAMES, write_keypair
from .mount import MountConfig, mount_background, umount
from .pack import pack
from .serve import RangeServer
from .testing.faultproxy import FaultProxy

console = Console()
WORK = Path(".demo")
APP = '''\
"""A tiny "application": starts at once, reads only what it needs."""
import hashlib, sys, time
from pathlib import Path
import greeter

here = Path(__file__).parent
started = time.monotonic()
print(greeter.hello("incfs"))
level = here / "assets" / "level1.bin"
with open(level, "rb") as f:
    head = f.read(256 * 1024)          # only the start of a big asset
print(f"level1 header sha256 {hashlib.sha256(head).hexdigest()[:16]}")
print(f"app ready after {time.monotonic() - started:.2f}s, before the download ended")
'''


def build_tree(root: Path) -> None:
    (root / "assets").mkdir(parents=True)
    (root / "greeter").mkdir()
    (root / "run.py").write_text(APP)
    (root / "greeter" / "__init__.py").write_text(
        "def hello(name):\n    return f'hello from {name}: this code came over the network'\n")
    for i, size in enumerate((24, 16, 8), start=1):
        seed = bytes(range(256)) * 4096
        with open(root / "assets" / f"level{i}.bin", "wb") as f:
            for chunk in range(size):
                f.write(os.urandom(512 * 1024) + seed[: 512 * 1024])
    (root / "README.txt").write_text("sample tree packed by `make demo`\n" * 100)


def step(text: str) -> None:
    console.print(f"\n[bold cyan]==>[/] {text}")


def run() -> int:
    if os.geteuid() != 0:
        console.print("[red]make demo needs root (FUSE mounts and /run).[/]")
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    src, image, mnt, key = WORK / "app", WORK / "app.img", WORK / "mnt", WORK / "demo.key"
    mnt.mkdir()
    step("building a sample application tree (48 MiB of assets)")
    build_tree(src)
    step("signing key and pack: incfs keygen / incfs pack --compress zstd --sign-key")
    write_keypair(key, ALGORITHM_NAMES["ed25519"])
    stats = pack(src, image, compress="zstd", sign_key=key)
    console.print(f"packed {stats.files} files, {stats.bytes_in >> 20} MiB in, "
                  f"{image.stat().st_size >> 20} MiB image")
    with RangeServer(image) as server, FaultProxy(_host_port(server.url),
                                                  delay_up=0.01, delay_down=0.01,
                                                  rate_down=6_000_000) as proxy:
        url = proxy.url("/" + image.name)
        step(f"serving over HTTP with 20 ms RTT and ~48 Mbit/s: {url}")
        t0 = time.monotonic()
        mount_background(MountConfig(source=url, mountpoint=str(mnt), cache=str(WORK / "cache.img"),
                                     key=str(key) + ".pub", prefetch="sequential"))
        console.print(f"mounted in {time.monotonic() - t0:.2f}s; the tree is visible already:")
        console.print(subprocess.run(["ls", "-l", str(mnt), str(mnt / "assets")],
                                     capture_output=True, text=True).stdout)
        try:
            streamed = _run_app_while_streaming(mnt)
        finally:
            umount(str(mnt))
    return streamed or _run_offline(mnt, key, url)


def _run_offline(mnt: Path, key: Path, url: str) -> int:
    """The server is gone now: the complete cache mounts and runs offline."""
    step("server stopped; remounting the same URL from the complete cache, offline")
    mount_background(MountConfig(source=url, mountpoint=str(mnt), cache=str(WORK / "cache.img"),
                                 key=str(key) + ".pub", prefetch="none"))
    try:
        app = subprocess.run([sys.executable, str(mnt / "run.py")], capture_output=True,
                             text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        console.print(app.stdout.rstrip() or app.stderr)
        status = read_status(str(mnt))
        console.print(f"complete: {status['complete']}, fetched this time: "
                      f"{status['bytes_fetched']} bytes")
        ok = app.returncode == 0 and status["complete"] and status["bytes_fetched"] == 0
    finally:
        umount(str(mnt))
    console.print("\n[bold green]demo finished: streamed, verified, and works offline.[/]"
                  if ok else "\n[bold red]offline remount failed[/]")
    return 0 if ok else 1


def _run_app_while_streaming(mnt: Path) -> int:
    step("running the program from the mount while the image streams in")
    app = subprocess.run([sys.executable, str(mnt / "run.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    console.print(app.stdout.rstrip() or app.stderr)
    _show_presence(mnt, "which blocks are here so far (incfs status --map)", "early")
    step("the rest streams in the background (incfs status --watch)")
    watch_status(str(mnt))
    _show_presence(mnt, "and now (incfs status --map --png)", "complete")
    step("final status (incfs status)")
    status = read_status(str(mnt))
    console.print(format_status(status))
    ok = app.returncode == 0 and status["complete"]
    if not ok:
        console.print("\n[bold red]demo failed while streaming[/]")
    return 0 if ok else 1


def _show_presence(mnt: Path, title: str, name: str) -> None:
    step(title)
    picture = presence.query(str(mnt))
    console.print(presence.terminal(picture, rows=6))
    png = WORK / f"presence-{name}.png"
    presence.write_png(picture, png)
    console.print(f"(also drawn in {png})")


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


if __name__ == "__main__":
    sys.exit(run())
