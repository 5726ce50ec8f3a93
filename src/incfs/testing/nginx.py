"""A throw-away nginx serving a directory read-only, for tests and benchmarks.

Why real nginx: the HTTP block source must be right against a production
server's Range handling (206, Content-Range, 416, multi-connection keep-alive),
not against our own idea of it.  Each instance gets a private prefix with its
own config, pid file, logs and temp dirs, so nothing in /etc/nginx or
/var/log/nginx is read or written, and any number can run side by side.

The access log records one tab-separated line per request so tests can count
requests and check which Range each one asked for (see :meth:`Nginx.requests`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

from incfs.testing.netns import call_in_netns, ns_exec_argv

__all__ = ["NGINX_BIN", "LogEntry", "Nginx"]

NGINX_BIN = "/usr/sbin/nginx"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
T = TypeVar("T")
_START_ATTEMPTS = 3  # a free port can be taken between probe and bind

_LOG_FORMAT = "$msec\\t$request\\t$status\\t$http_range\\t$body_bytes_sent\\t$connection\\t$connection_requests"

_CONFIG = """\
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    access_log off;
    log_format incfs "{log_format}";
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    server_tokens off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
{extra_temp_paths}
    server {{
        listen {listen};
        root {root};
        access_log {prefix}/access.log incfs;
        location / {{
            limit_except GET {{ deny all; }}
        }}
    }}
}}
"""


@dataclass(frozen=True)
class LogEntry:
    """One access-log line.  ``range`` is None when no Range header was sent."""

    time: float
    method: str
    path: str
    protocol: str
    status: int
    range: str | None
    body_bytes: int
    connection: int
    connection_request: int


class Nginx:
    """nginx in the foreground serving ``root_dir`` on ``host``:``port``.

    ``port=None`` picks a free port.  With ``netns`` the server runs inside
    that network namespace (``nsenter --net``), and ``host`` must be an address
    that exists there (e.g. :attr:`EmulatedLink.ns_addr`).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        netns: str | None = None,
        workers: int = 1,
    ) -> None:
        self.root_dir = Path(root_dir).resolve()
        self.host = host
        self.port = port or 0
        self.netns = netns
        self.workers = workers
        self.prefix: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._fixed_port = port is not None

    # ------------------------------------------------------------------ life
    def start(self) -> Self:
        """Start nginx and return once it accepts TCP connections."""
        if self.proc is not None:
            raise RuntimeError("nginx already started")
        if not self.root_dir.is_dir():
            raise NotADirectoryError(self.root_dir)
        self.prefix = Path(tempfile.mkdtemp(prefix="incfs-nginx-"))
        try:
            self._start_with_retries()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Fast-shutdown nginx (SIGTERM), escalate to SIGKILL, remove the prefix."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _terminate(proc)
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None

    close = stop

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------- addresses
    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def url(self, path: str = "") -> str:
        """URL of ``path`` (relative to ``root_dir``) on this server."""
        return self.base_url + path.lstrip("/")

    # -------------------------------------------------------------- the logs
    @property
    def access_log(self) -> Path:
        return self._require_prefix() / "access.log"

    @property
    def error_log(self) -> Path:
        return self._require_prefix() / "error.log"

    def requests(self) -> list[LogEntry]:
        """All requests logged so far (nginx writes the log unbuffered)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [entry for line in text.splitlines() if (entry := _parse_line(line)) is not None]

    def clear_requests(self) -> None:
        """Empty the access log (nginx keeps appending to the same inode)."""
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.access_log, 0)

    # -------------------------------------------------------------- internals
    def _require_prefix(self) -> Path:
        if self.prefix is None:
            raise RuntimeError("nginx not started")
        return self.prefix

    def _start_with_retries(self) -> None:
        for attempt in range(_START_ATTEMPTS):
            if not self._fixed_port:
                self.port = self._free_port()
            self._write_config()
            self.proc = self._spawn()
            try:
                self._wait_ready(self.proc)
                return
            except _StartFailed as exc:
                _terminate(self.proc)
                self.proc = None
                if self._fixed_port or attempt == _START_ATTEMPTS - 1 or "in use" not in str(exc):
                    raise RuntimeError(f"nginx failed to start: {exc}") from None

    def _free_port(self) -> int:
        """Ask the kernel for a free port in the namespace nginx will use."""
        def probe() -> int:
            with socket.socket(_family(self.host), socket.SOCK_STREAM) as sock:
                sock.bind((self.host, 0))
                return int(sock.getsockname()[1])

        return _in_netns(self.netns, probe)

    def _write_config(self) -> None:
        prefix = self._require_prefix()
        (prefix / "tmp").mkdir(exist_ok=True)
        host = f"[{self.host}]" if ":" in self.host else self.host
        extra = "".join(
            f"    {mod}_temp_path {prefix}/tmp/{mod};\n" for mod in ("fastcgi", "uwsgi", "scgi") if _has_module(mod)
        )
        config = _CONFIG.format(
            user="user root;" if os.geteuid() == 0 else "",
            workers=self.workers,
            prefix=prefix,
            log_format=_LOG_FORMAT,
            extra_temp_paths=extra,
            listen=f"{host}:{self.port}",
            root=self.root_dir,
        )
        (prefix / "nginx.conf").write_text(config)
        with contextlib.suppress(FileNotFoundError):
            (prefix / "nginx.pid").unlink()

    def _spawn(self) -> subprocess.Popen[bytes]:
        prefix = self._require_prefix()
        argv = [NGINX_BIN, "-p", f"{prefix}/", "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"]
        if self.netns is not None:
            argv = ns_exec_argv(self.netns, argv)  # nsenter execs nginx: same pid
        # Own session so a last-resort killpg also reaches the workers.
        with open(prefix / "stderr.log", "wb") as stderr:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Poll (bounded) until nginx accepts connections or dies."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        pid_file = self._require_prefix() / "nginx.pid"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise _StartFailed(self._startup_errors())
            # nginx writes the pid file after binding its listening sockets.
            if pid_file.exists() and _in_netns(self.netns, self._port_open):
                return
            time.sleep(0.02)
        raise _StartFailed(f"not ready after {_START_TIMEOUT_S}s: {self._startup_errors()}")

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _startup_errors(self) -> str:
        prefix = self._require_prefix()
        texts = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(FileNotFoundError):
                texts.append((prefix / name).read_text(errors="replace").strip())
        return " | ".join(t for t in texts if t) or "no error output"


class _StartFailed(Exception):
    pass


def _parse_line(line: str) -> LogEntry | None:
    fields = line.split("\t")
    if len(fields) != 7:
        return None
    msec, request, status, rng, sent, conn, conn_req = fields
    method, _, rest = request.partition(" ")
    path, _, protocol = rest.rpartition(" ") if " " in rest else (rest, "", "")
    return LogEntry(
        time=float(msec),
        method=method,
        path=path,
        protocol=protocol,
        status=int(status),
        range=None if rng == "-" else rng,
        body_bytes=int(sent),
        connection=int(conn),
        connection_request=int(conn_req),
    )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (nginx fast shutdown), then SIGKILL the whole process group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(_STOP_TIMEOUT_S)  # the master waits for its workers
    except subprocess.TimeoutExpired:
        # Master still alive, so its pid is still our group id: kill it all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(_STOP_TIMEOUT_S)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@functools.cache
def _has_module(name: str) -> bool:
    """Whether nginx was built with the ``name`` http module (nginx -V)."""
    out = subprocess.run([NGINX_BIN, "-V"], capture_output=True, text=True, timeout=10)
    return f"--without-http_{name}_module" not in out.stderr + out.stdout


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` here, or in a thread switched into ``netns``."""
    return fn() if netns is None else call_in_netns(netns, fn)
