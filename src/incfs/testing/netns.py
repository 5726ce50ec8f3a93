"""An emulated network link: a namespace joined to the host by a shaped veth.

Why: loopback has effectively infinite bandwidth, so it cannot show how the
block fetcher behaves on a real link (prefetch depth, parallel ranges, head of
line blocking).  A veth pair whose ends both have a ``tbf`` qdisc gives a real
kernel TCP path with a hard bandwidth cap.  The kernel here has no ``netem``,
so delay is added separately by :class:`incfs.testing.faultproxy.FaultProxy`.

Only addresses we assign ourselves are used: ``10.200.<n>.1`` on the host end
and ``10.200.<n>.2`` in the namespace, a /30 per link.  Namespaces are named
``incfs-t-<pid>-<n>`` so :func:`cleanup_stale` can find the leftovers of a
crashed run by their dead owner pid.  Everything here needs root.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from incfs.procs import process_alive

__all__ = ["NS_PREFIX", "EmulatedLink", "LinkSetupError", "call_in_netns", "cleanup_stale", "missing_feature"]

T = TypeVar("T")

NS_PREFIX = "incfs-t-"
_IF_PREFIX = "ifs"  # veth names must fit IFNAMSIZ (15 chars): ifs<pid>h<n>
_SUBNET = "10.200"
_LOCK_PATH = Path("/run/lock/incfs-netns.lock")
_CMD_TIMEOUT_S = 15.0
_CALL_TIMEOUT_S = 30.0
_KILL_GRACE_S = 2.0
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()


class LinkSetupError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message carries its stderr."""


# ---------------------------------------------------------------- commands
def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinkSetupError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise LinkSetupError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _list_netns() -> list[str]:
    """Names from ``ip netns list`` (lines look like ``name (id: 3)``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


# ------------------------------------------------------------- namespaces
def call_in_netns(name: str, fn: Callable[[], T], timeout: float = _CALL_TIMEOUT_S) -> T:
    """Run ``fn`` in a fresh thread that has joined network namespace ``name``.

    setns(CLONE_NEWNET) only affects the calling thread, so the rest of the
    process stays where it is; sockets created by ``fn`` live in ``name``.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(name)
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in netns {name} did not finish in {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def _setns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _ns_pids(name: str) -> list[int]:
    """Live (non-zombie) processes in namespace ``name``, never ourselves."""
    out = _ip("netns", "pids", name, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]


def _kill_ns_processes(name: str) -> None:
    """End processes still inside our namespace; they would keep it alive.

    Re-listing via ``ip netns pids`` (rather than probing pids) treats our own
    unreaped children as gone: zombies have already left the namespace.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid in _ns_pids(name) if _signal(pid, sig)]
        deadline = time.monotonic() + _KILL_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _ns_pids(name)
        if not pids:
            return


def _stop_procs(procs: list[subprocess.Popen[Any]]) -> None:
    """Terminate and reap children we started, escalating to SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_KILL_GRACE_S)


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _delete_ns(name: str, host_if: str | None = None) -> None:
    """Best-effort removal of a namespace and (if given) its host veth end."""
    with contextlib.suppress(LinkSetupError):
        _kill_ns_processes(name)
    if host_if is not None:
        _ip("link", "del", host_if, check=False)
    _ip("netns", "del", name, check=False)


def ns_exec_argv(ns_name: str, argv: Sequence[str]) -> list[str]:
    """Run argv in the namespace's network only. `ip netns exec` would also
    give it a private copy of every mount, FUSE mounts included, which keeps
    those alive (and their daemons running) after they are unmounted here."""
    return ["nsenter", f"--net=/run/netns/{ns_name}", "--", *argv]


def cleanup_stale(prefix: str = NS_PREFIX, *, include_live: bool = False) -> list[str]:
    """Remove namespaces (and host veths) left behind by crashed runs.

    A namespace counts as stale when the pid in its name no longer exists;
    with ``include_live`` every namespace with ``prefix`` is removed.
    Processes still running inside a removed namespace (e.g. an orphaned
    nginx) are killed, otherwise the namespace and its veth would linger.
    Returns the names of the removed namespaces.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-\d+$")
    removed = []
    for name in _list_netns():
        match = pattern.match(name)
        if match and (include_live or not process_alive(int(match.group(1)))):
            _delete_ns(name)
            removed.append(name)
    _delete_stale_veths(include_live)
    return removed


def _delete_stale_veths(include_live: bool) -> None:
    pattern = re.compile(rf"^{_IF_PREFIX}(\d+)h\d+$")
    for line in _ip("-o", "link", "show", "type", "veth").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = pattern.match(name)
        if match and (include_live or not process_alive(int(match.group(1)))):
            _ip("link", "del", name, check=False)


def missing_feature() -> str | None:
    """Why :class:`EmulatedLink` cannot work here, or None if it can.

    Tries each kernel feature in turn so a skip reason names the real gap.
    """
    ns, host_if, ns_if = _new_names()
    steps: list[tuple[str, list[str]]] = [
        ("network namespaces (CONFIG_NET_NS)", ["ip", "netns", "add", ns]),
        ("veth (CONFIG_VETH)", ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns]),
        ("tbf qdisc (CONFIG_NET_SCH_TBF)",
         ["tc", "qdisc", "add", "dev", host_if, "root", "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms"]),
    ]  # fmt: skip
    try:
        for feature, argv in steps:
            try:
                _run(argv)
            except LinkSetupError as exc:
                return f"{feature} unavailable: {exc}"
        return None
    finally:
        _delete_ns(ns, host_if)


def _new_names() -> tuple[str, str, str]:
    """(namespace, host veth end, namespace veth end), unique per process."""
    n = next(_counter)
    pid = os.getpid()
    return f"{NS_PREFIX}{pid}-{n}", f"{_IF_PREFIX}{pid}h{n}", f"{_IF_PREFIX}{pid}n{n}"


@contextlib.contextmanager
def _address_lock() -> Iterator[None]:
    """Serialise subnet choice across processes creating links concurrently."""
    _LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_subnet() -> int:
    """Smallest ``n`` such that no host address is in 10.200.<n>.0/24."""
    used = set(re.findall(rf"inet {re.escape(_SUBNET)}\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout))
    for n in range(256):
        if str(n) not in used:
            return n
    raise LinkSetupError(f"no free {_SUBNET}.<n>.0/30 subnet (256 links in use?)")


# ------------------------------------------------------------------ links
class EmulatedLink:
    """A namespace behind a veth pair shaped with tbf on both ends.

    ``rate_bit`` caps traffic from the namespace to the host (downloads from a
    server running in the namespace); ``rate_bit_up`` caps the other way and
    defaults to ``rate_bit``.  ``None`` leaves a direction unshaped.
    """

    def __init__(
        self,
        rate_bit: int | None = 100_000_000,
        *,
        rate_bit_up: int | None = None,
        latency_s: float = 0.05,
        burst_bytes: int | None = None,
    ) -> None:
        self.rate_bit = rate_bit
        self.rate_bit_up = rate_bit if rate_bit_up is None else rate_bit_up
        self.latency_s = latency_s
        self.burst_bytes = burst_bytes
        self.ns_name, self.host_if, self.ns_if = _new_names()
        self.host_addr = ""
        self.ns_addr = ""
        self._up = False
        self._procs: list[subprocess.Popen[Any]] = []

    # ------------------------------------------------------------------ life
    def start(self) -> Self:
        """Create namespace, veth, addresses and qdiscs; undo all on failure."""
        if self._up:
            raise RuntimeError("link already started")
        self._up = True
        try:
            with _address_lock():
                n = _free_subnet()
                self.host_addr, self.ns_addr = f"{_SUBNET}.{n}.1", f"{_SUBNET}.{n}.2"
                self._create_devices()
            self.set_rate(self.rate_bit, self.rate_bit_up)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Kill processes left in the namespace, delete it and the veth."""
        if self._up:
            self._up = False
            procs, self._procs = self._procs, []
            _stop_procs(procs)  # also those not yet inside the namespace
            _delete_ns(self.ns_name, self.host_if)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --------------------------------------------------------------- shaping
    def set_rate(self, rate_bit: int | None, rate_bit_up: int | None = None) -> None:
        """(Re)shape both directions; ``rate_bit_up`` defaults to ``rate_bit``."""
        self.rate_bit = rate_bit
        self.rate_bit_up = rate_bit if rate_bit_up is None else rate_bit_up
        self._shape(["tc", "-n", self.ns_name], self.ns_if, self.rate_bit)
        self._shape(["tc"], self.host_if, self.rate_bit_up)

    def _shape(self, tc: list[str], dev: str, rate_bit: int | None) -> None:
        if rate_bit is None:
            _run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)
            return
        # Burst: >= 10 ms of traffic and several MTUs, or tbf stalls TCP;
        # latency bounds the queue so it drops like a real router would.
        burst = self.burst_bytes or max(32 * 1024, rate_bit // 8 // 100)
        _run([
            *tc, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{rate_bit}bit", "burst", str(burst), "latency", f"{self.latency_s * 1000:.0f}ms",
        ])  # fmt: skip

    # -------------------------------------------------------------- helpers
    def run_in_ns(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; close() kills it if still alive."""
        proc = subprocess.Popen(ns_exec_argv(self.ns_name, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread inside the namespace (see :func:`call_in_netns`)."""
        return call_in_netns(self.ns_name, fn)

    def _create_devices(self) -> None:
        ns, nsi = self.ns_name, self.ns_if
        _ip("netns", "add", ns)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", nsi, "netns", ns)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", ns, "addr", "add", f"{self.ns_addr}/30", "dev", nsi)
        _ip("-n", ns, "link", "set", nsi, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
