"""Helpers shared by the loader tests (test_loader*.py): mounting with a
guaranteed unmount, status polling, reads in a thread, checking a cache, and
a small HTTP server whose misbehaviour can be switched at run time.

(No tests here; the name only keeps it with the loader's test files.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from incfs.mount import MountConfig, mount_background, runtime_dir, umount
from incfs.procs import process_alive

MiB = 1 << 20


@contextlib.contextmanager
def mounted(config: MountConfig):
    """Mount in the background; always unmounted (and the daemon gone) after."""
    mount_background(config)
    try:
        yield Path(config.mountpoint)
    finally:
        force_umount(config.mountpoint)


def force_umount(mountpoint: str) -> None:
    pid_file = runtime_dir(mountpoint) / "pid"
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
    if os.path.ismount(mountpoint):
        try:
            umount(mountpoint, timeout=30)
        except Exception:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                           capture_output=True)
    if pid and process_alive(pid):
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def status(mountpoint) -> dict:
    return json.loads((Path(mountpoint) / ".incfs" / "status").read_text())


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_complete(mountpoint, timeout: float = 60.0) -> dict:
    def done():
        s = status(mountpoint)
        return s["complete"] and s.get("loader", {}).get("complete", True) and s
    return wait_for(done, timeout, interval=0.1, what="the image to be complete")


class ReadThread(threading.Thread):
    """Read a whole file (or a range) in a thread; `.result` or `.error`."""

    def __init__(self, path, offset: int = 0, length: int | None = None):
        super().__init__(daemon=True)
        self.path, self.offset, self.length = Path(path), offset, length
        self.result: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                self.result = f.read() if self.length is None else f.read(self.length)
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            self.error = e


def tree_files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            if full.is_symlink():
                continue
            out[str(full.relative_to(root))] = full.read_bytes()
    return out


def assert_cache_clean(cache: Path, *, complete: bool | None = None):
    """Nothing wrong is stored: every present block of the cache verifies."""
    from incfs.verify import verify_image

    report = verify_image(cache)
    assert report.integrity_failures == 0, [str(p) for p in report.problems]
    assert report.io_errors == 0, [str(p) for p in report.problems]
    if complete is not None:
        assert report.complete is complete, report.summary()
    return report


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# --- a switchable, misbehaving HTTP range server -----------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class BadServer:
    """Serves one file with Range support; `mode` (changeable at any time):

    ok        correct 206 answers
    503       every GET answers 503 Service Unavailable
    full200   ignores Range: 200 with the whole file
    badrange  206 whose Content-Range names another range than asked
    short     correct headers, then the body is cut short and the connection closed
    corrupt   one byte of every body flipped
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.mode = "ok"
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                outer.requests += 1
                size = outer.path.stat().st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                outer.requests += 1
                data = outer.path.read_bytes()
                mode = outer.mode
                match = _RANGE.fullmatch(self.headers.get("Range", ""))
                if mode == "503":
                    body = b"busy"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if match is None or mode == "full200":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                start = int(match[1])
                end = int(match[2]) if match[2] else len(data) - 1
                end = min(end, len(data) - 1)
                body = data[start:end + 1]
                shown = (start, end)
                if mode == "badrange":
                    shown = (start + 4096, end + 4096)
                if mode == "corrupt" and body:
                    body = bytearray(body)
                    body[len(body) // 2] ^= 0xFF
                    body = bytes(body)
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {shown[0]}-{shown[1]}/{len(data)}")
                self.end_headers()
                if mode == "short":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{self.path.name}"

    def __enter__(self) -> "BadServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
