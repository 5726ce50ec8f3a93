"""Mounting: wires an Image, the Service, FUSE, the control server and (for
remote sources) the built-in loader together, and runs them in one trio loop.

`incfs mount` without --foreground starts this module as a child process and
returns once the child reports that the mount is ready (or why it is not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import kmount, preconnect, startup
from .errors import CorruptImage, IncfsError, IntegrityError, UsageError
from .loader.config import DEFAULTS
from .procs import process_alive, runs_module, wait_gone
from .rundir import drop_pid_file, runtime_dir

# The daemon's machinery (trio, FUSE, the image, the loader, httpx) is
# imported where it is used, not here: `incfs mount` imports this module
# only to start the daemon, and loading it all first cost the command about
# as much as the daemon's own start.
if TYPE_CHECKING:
    import trio

    from collections.abc import Callable

    from . import fuse
    from .forked import Forked
    from .fusefs import IncfsOperations
    from .image import Image
    from .service import Service
    from .sources import Source

log = logging.getLogger("incfs.mount")
READY_TIMEOUT = 120.0
SUPERVISOR_GRACE = 3.0  # seconds umount waits for the supervisor after its daemon
READAHEAD_COMPLETE_KB = 8192
READAHEAD_LOADING_KB = 1024


@dataclass
class MountConfig:
    source: str
    mountpoint: str
    cache: str | None = None
    key: str | None = None
    allow_unsigned: bool = False
    read_timeout: float | None = None  # None: wait forever
    prefetch: str = DEFAULTS.prefetch
    max_tasks: int = 4096
    source_options: dict | None = None
    # built-in loader (incfs.loader) for remote sources and caches; defaults
    # and their reasons: incfs.loader.config.LoaderConfig
    mirrors: list[str] | None = None  # more URLs of the same image, tried in order
    amplify: int = DEFAULTS.amplify  # bytes: a miss fetches up to this much around it
    max_inflight: int = DEFAULTS.max_inflight  # source requests in flight at once
    bandwidth: float | None = DEFAULTS.bandwidth  # bytes/s cap for background prefetch
    base_cache: str | None = None  # an older image whose identical blocks are reused
    inflight_budget: int = DEFAULTS.inflight_budget  # bytes in flight at most
    readahead_max: int = DEFAULTS.readahead_max  # largest readahead window, bytes
    passthrough: bool = True  # complete files served by the kernel (root, kernel 6.9+)
    metrics_listen: str | None = None  # HOST:PORT of HTTP /metrics (None: off)
    supervise: bool = True  # a supervisor restarts a daemon that dies (background mounts)
    devices: bool = False  # device nodes usable (root; a trusted rootfs image): else nodev
    setuid: bool = False  # setuid/setgid bits and file capabilities honoured: else nosuid
    owners: str = "auto"  # "stored", "mine" (the mounting user's), auto: stored for root
    cache_size: int | None = None  # bytes the cache file may take on disk (incfs.space.cap)


def is_remote(source: str) -> bool:
    """Whether the source is read over the network (the sources registry
    knows each backend's schemes)."""
    from .sources import is_remote as remote_spec

    return remote_spec(source)


class Backing:
    """What a mount serves: its image, and the source its metadata was just
    fetched from, if it was (the loader takes that over, connections open)."""

    def __init__(self, image: Image, source: Source | None = None) -> None:
        self.image, self.source = image, source


async def open_backing(config: MountConfig) -> Backing:
    """The backing image for a mount, checked against the key policy."""
    from .loader import open_cache

    source = None
    if runs_loader(config):  # the built-in loader owns caches of sources
        image, source = await open_cache(config)
    else:
        image = _open_local(config)
    try:
        check_trust(image, config)
        check_cache_size(image, config)
    except BaseException:
        image.close()
        if source is not None:
            await source.aclose()
        raise
    return Backing(image, source)


def _open_local(config: MountConfig) -> Image:
    """An empty mount's backing image (made if need be), or a local image."""
    from .image import Image
    from .loader import default_cache

    if config.source == "empty":
        path = Path(config.cache) if config.cache else default_cache(config)
        return Image.open(path, writable=True) if path.exists() else Image.create(path)
    path = Path(config.source)
    if not path.exists():
        raise UsageError(f"{path}: no such image")
    return Image.open(path, writable=os.access(path, os.W_OK))


def check_cache_size(image: Image, config: MountConfig) -> None:
    if config.cache_size is None:
        return
    from .format.layout import SuperFlags
    from .space import cap as space_cap

    if not image.superblock.flags & SuperFlags.CACHE:
        raise UsageError("--cache-size caps a cache of a source (a URL, or --cache): "
                         f"{image.path} is not one")
    space_cap.check(image, config.cache_size)


def check_trust(image: Image, config: MountConfig) -> None:
    if config.key:
        from .integrity import signing

        image.verify_signature(signing.load_public(config.key))
        if image.changed_since_signature():
            raise IntegrityError("names were added or changed after the image was signed: "
                                 "the signature does not cover them (see incfs verify --key)")
    elif config.source == "empty":
        return  # the owner's own loader fills it: nothing to check against
    elif not config.allow_unsigned:
        what = "signed, but no --key was given" if image.signature else "not signed"
        raise IntegrityError(f"image is {what}; pass --key KEY.pub, or --allow-unsigned "
                             "to mount it without checking who made it")


class _Ending:
    """Why the session's scope was cancelled."""

    def __init__(self) -> None:
        self.handing_over = False  # SIGUSR2: a supervisor starts a new daemon


# What serve() uses, imported ahead of it (by _import_serving, an early
# child, incfs.early_fork, and the warm process, incfs.warm): the image code
# first, which a new cache wants as soon as its metadata is in. And what a
# loader adds: its cache's start, the early answer's reader, the loader.
SERVING_MODULES = ("incfs.image", "incfs.fuse", "incfs.fusefs", "incfs.metrics_http",
                   "incfs.passthrough", "incfs.service", "incfs.control.server")
LOADER_MODULES = ("incfs.loader.cache", "incfs.loader.early", "incfs.loader.core")


class Succession:
    """How a daemon stands to the supervisor (supervisor.py), if it has one.
    The first daemon mounts and hands the connection up through
    `handover_fd`; a later one takes it over from `resume_fd`, with what the
    first one's INIT settled."""

    def __init__(self, handover_fd: int | None = None, resume_fd: int | None = None,
                 connection: dict | None = None, restarts: int = 0) -> None:
        self.handover_fd, self.resume_fd = handover_fd, resume_fd
        self.connection, self.restarts = connection, restarts
        self.warm = False  # started by the warm process (incfs.warm), not cold
        self.early = False  # started by the command's early child (incfs.early_fork)

    @property
    def supervised(self) -> bool:
        return self.handover_fd is not None or self.resume_fd is not None


async def serve(config: MountConfig, image: Image, ready=None,
                succession: Succession | None = None, source: Source | None = None) -> bool:
    """Run the mount until it is unmounted (or SIGTERM/SIGINT). Returns True
    when it ended to make way for a new daemon (SIGUSR2 under a supervisor)."""
    import trio

    from . import fuse, passthrough
    from .control.server import ControlServer
    from .fusefs import IncfsOperations
    from .metrics_http import start_metrics
    from .service import Service

    succession = succession or Succession()
    rundir = runtime_dir(config.mountpoint)  # before mounting: it looks at the mount point
    service = Service(image, config.read_timeout)
    service.restarts = succession.restarts
    service.supervised = succession.supervised
    service.warm_start = succession.warm
    service.early_start = succession.early
    if config.cache_size is not None:
        from .space import cap as space_cap

        service.space = space_cap.CacheCap(image, config.cache_size)
        service.space.make_room(0)  # a cache over a new, smaller cap: down at once
        service.waits.read_hooks.append(service.space.touch)
    control = ControlServer(service, rundir / "control.sock", os.getuid())
    listener = control.listen()
    ops = IncfsOperations(service, str(control.path),
                          stored_owners=None if config.owners == "auto" else config.owners == "stored")
    if succession.resume_fd is not None:
        fd = succession.resume_fd
    else:
        options = fuse.MountOptions(fsname=_fsname(config), allow_other=os.geteuid() == 0,
                                    devices=config.devices, setuid=config.setuid)
        fd = fuse.mount(config.mountpoint, options)
    # Under a cap no plain copies are made: they would sit outside it.
    session = fuse.Session(fd, ops, passthrough=config.passthrough and passthrough.possible()
                           and config.cache_size is None)
    service.fuse = session
    if succession.resume_fd is not None:
        session.resume(fuse.Connection.from_dict(succession.connection))
    (rundir / "pid").write_text(f"{os.getpid()}\n")
    serving, ending = trio.CancelScope(), _Ending()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, listener)
            start_metrics(config, service, nursery)
            loader = _start_loader(config, service, nursery, source)
            nursery.start_soon(_on_signals, config.mountpoint, serving, ending,
                               succession.supervised)
            nursery.start_soon(_when_connected, session, ops, service, config, ready, nursery,
                               succession, rundir)
            with serving:
                await session.run()
            if loader is not None:
                await loader.aclose()
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
        for leftover in (rundir / "pid", control.path):
            leftover.unlink(missing_ok=True)
    return ending.handing_over


async def _when_connected(session: fuse.Session, ops: IncfsOperations, service: Service,
                          config: MountConfig, ready, nursery: trio.Nursery,
                          succession: Succession, rundir: Path) -> None:
    """After INIT (the kernel sends it at once; a resumed daemon has it
    already): hand the connection to the supervisor, set up passthrough, tune
    readahead, then report ready. stat() of the mount point is served by this
    very loop, so it runs in a worker thread."""
    import trio

    from . import passthrough
    from .supervisor import hand_over

    await session.connected.wait()
    if succession.handover_fd is not None:
        hand_over(succession.handover_fd, session.fd, session.conn.as_dict())
    if session.conn.passthrough:
        ops.passthrough = await nursery.start(
            passthrough.Passthrough.run, session, service,
            rundir / "passthrough", succession.resume_fd is not None,
            config.mountpoint)
    readahead = READAHEAD_COMPLETE_KB if service.status()["complete"] else READAHEAD_LOADING_KB
    _tune_readahead(config.mountpoint, readahead)
    service.ready.set()
    if ready:
        ready()


def _fsname(config: MountConfig) -> str:
    """What findmnt and /proc/mounts show as the source: the URL, or the
    image's absolute path (an empty mount: its backing image)."""
    if is_remote(config.source):
        return config.source
    if config.source == "empty":
        return f"empty:{os.path.abspath(config.cache)}" if config.cache else "empty"
    return os.path.abspath(config.source)


def runs_loader(config: MountConfig) -> bool:
    """Whether the mount runs the built-in loader: a remote source, or a
    cache of any source but an empty mount's."""
    return is_remote(config.source) or bool(config.cache and config.source != "empty")


def _start_loader(config: MountConfig, service: Service, nursery, source: Source | None):
    if not runs_loader(config):
        return None
    from .loader import start_loader

    return start_loader(config, service, nursery, source)


async def _on_signals(mountpoint: str, serving: trio.CancelScope, ending: _Ending,
                      supervised: bool) -> None:
    """SIGTERM/SIGINT: detach the mount lazily (open files keep working; the
    daemon ends when the kernel says the last user is gone). If it is not
    mounted here any more, a copy in another mount namespace is keeping the
    connection alive: close it (the kernel aborts a connection whose last
    /dev/fuse fd is closed), which ends this daemon cleanly.

    SIGUSR2, under a supervisor: stop serving and exit (after the loader's
    final sync) so that a new daemon takes the connection over. Not once the
    supervisor is gone (this process's parent is then another): no new
    daemon would come, and every program using the mount would lose it."""
    import trio

    from . import fuse

    wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR2] if supervised else [])
    with trio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR2 and not _supervisor_alive():
                log.warning("asked to make way, but the supervisor is gone: serving on")
                continue
            if signum == signal.SIGUSR2:
                log.info("making way for a new daemon")
                ending.handing_over = True
                serving.cancel()
                return
            try:
                await trio.to_thread.run_sync(fuse.unmount, mountpoint, True)
            except OSError as e:
                log.info("not mounted here (%s): closing the FUSE connection", e.strerror)
                serving.cancel()
            return


def _supervisor_alive() -> bool:
    """Whether this daemon's parent is still its supervisor (a dead one's
    children go to init or a subreaper, by another name)."""
    from .forked import SUPERVISOR_NAME, process_name

    return process_name(os.getppid()) == SUPERVISOR_NAME


def _tune_readahead(mountpoint: str, kb: int) -> None:
    """Set the mount's readahead window (root only; best effort): large when
    every block is local (the daemon is CPU-bound, and more requests in flight
    keep both cores busy), 1 MiB while loading (each readahead request past
    what a program needs would be fetched over the network). The device
    number comes from the mount table, not a stat() of the mount point: that
    would be served by this daemon's own loop (so a worker thread, a few ms of
    a mount's start), and holds the mount busy for an unmount meanwhile."""
    device = kmount.fuse_device_at(mountpoint)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb").write_text(str(kb))
    except OSError:
        pass


# --- running in the foreground or as a background child ----------------------

def exit_code(e: BaseException) -> int:
    """The `incfs` exit code of a failed mount, the same in the foreground and
    in the background: 1 for an integrity failure (bad signature, damaged
    image), 2 for everything else (usage, I/O)."""
    return 1 if isinstance(e, (IntegrityError, CorruptImage)) else 2


def run_foreground(config: MountConfig, ready_fd: int | None = None,
                   succession: Succession | None = None) -> int:
    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)

    resuming = succession is not None and succession.resume_fd is not None
    supervisor = os.getppid() if succession is not None and succession.supervised else None
    if not resuming:
        from .loader import cachefile

        cachefile.ask_early(config)  # before trio and the HTTP client: ~90 ms sooner

    import trio

    from .supervisor import HANDOVER_EXIT, supervisor_pid_file

    try:
        if not resuming:  # a resumed daemon's mount point is mounted: by itself
            _check_mountpoint(config.mountpoint)
        _import_opening(config)
        handed_over = trio.run(_open_and_serve, config, ready, succession)
    except (IncfsError, OSError, RuntimeError) as e:
        _report_failure(ready_fd, e)
        return exit_code(e)
    if handed_over:
        return HANDOVER_EXIT  # the runtime files are the next daemon's
    if supervisor is not None and os.getppid() != supervisor:  # it was killed: its file stays
        drop_pid_file(supervisor_pid_file(runtime_dir(config.mountpoint)), supervisor)
    remove_runtime_dir(config.mountpoint)
    return 0


def _import_opening(config: MountConfig) -> None:
    """What opening the backing image needs first, imported before it
    starts; the rest is imported while it runs (_open_and_serve). A mount of
    a source needs only the source's client to send its metadata request:
    the image code (~28 ms) loads while that is on the wire. When the
    request was sent early, not even that: its answer is read without the
    client (incfs.loader.early), which the loader imports after its first
    read (incfs.loader.ondemand)."""
    if runs_loader(config):
        from . import preconnect
        from .loader import cachefile
        from .loader.remote import preload_loader_source

        cachefile.ask_early(config)  # ~40 ms before the HTTP client could send it
        if preconnect.was_asked(config.source):
            return
        preload_loader_source(config)
        cachefile.ask_early(config)  # (if the handshake was still on the wire)
    else:
        from . import image  # noqa: F401


async def _open_and_serve(config: MountConfig, ready, succession: Succession | None) -> bool:
    """Open the backing image, then serve it. For a remote source the
    metadata is on the wire for one to three round trips while a worker
    thread imports the image code and what serving needs (~40 ms here):
    time that would otherwise add to every mount's start."""
    import threading

    import trio

    importer = threading.Thread(target=_import_serving, args=(runs_loader(config),),
                                name="import-serving", daemon=True)
    importer.start()
    try:
        backing = await open_backing(config)
    finally:
        if importer.is_alive():  # done long since, mostly: no thread hop (~3 ms) then
            await trio.to_thread.run_sync(importer.join)
        startup.imports_done()
    try:
        return await serve(config, backing.image, ready, succession, backing.source)
    finally:
        backing.image.close()


def _import_serving(loading: bool) -> None:
    """The modules serve() (and the loader, if one runs) use, loaded ahead.
    (The loop's thread may meanwhile import a module this one is loading:
    it waits for it, as imports do; the package has no import cycle that
    could make that a deadlock.)"""
    from importlib import import_module

    for name in (*SERVING_MODULES, *(LOADER_MODULES if loading else ())):
        import_module(name)


def remove_runtime_dir(mountpoint: str, *, leftovers: bool = False) -> None:
    """Remove the mount's runtime directory once its daemon is done with it.
    Only an empty one is removed (a new daemon for the same mount point may
    already be using it), unless `leftovers`: the daemon was killed and could
    not remove its pid file and socket itself."""
    rundir = runtime_dir(mountpoint)
    if leftovers:
        for name in ("pid", "control.sock", "supervisor.pid"):
            with contextlib.suppress(OSError):
                (rundir / name).unlink()
    import shutil  # not at the top: with bz2 and lzma, ~4 ms of every mount command's start

    shutil.rmtree(rundir / "passthrough", ignore_errors=True)  # markers: this connection's
    with contextlib.suppress(OSError):
        rundir.rmdir()


def _report_failure(ready_fd: int | None, e: BaseException) -> None:
    message = _describe(e)
    if ready_fd is not None:
        # the kind travels with the message so the parent exits as the
        # child would have (1 for integrity, 2 for usage)
        kind = "integrity" if exit_code(e) == 1 else "usage"
        try:
            os.write(ready_fd, f"ERROR {kind} {message}\n".encode())
        except OSError:
            pass
    else:
        # the same line the `incfs` command prints for a background mount
        print(f"incfs: error: {' '.join(message.split())}", file=sys.stderr)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{': ' + str(e.filename) if e.filename else ''}"
    return str(e)


def _check_mountpoint(mountpoint: str) -> None:
    path = Path(mountpoint)
    if not path.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point")


def mount_background(config: MountConfig, ready_timeout: float = READY_TIMEOUT, *,
                     fork: bool = False,
                     early_child: Callable[..., Forked | None] | None = None) -> None:
    """Start the daemon and return once the mount is ready.

    With `fork` the supervisor (or the daemon) is forked from this process
    rather than started afresh, which saves ~25 ms: for the `incfs mount`
    command, not for programs that may run threads (see incfs.forked).
    `early_child` is the `run` of the command's early child, if it has one
    (incfs.early_fork): what it would fork runs there instead.
    A daemon that has not said READY (or why not) within `ready_timeout`
    seconds is killed, its half-made mount (if any) detached, and the mount
    fails with an error naming the log."""
    _check_mountpoint(config.mountpoint)
    read_end, write_end = os.pipe()
    args = [json.dumps(asdict(config)), str(write_end)]
    log_path = runtime_dir(config.mountpoint).parent / "daemon.log"
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # the source's TCP handshakes run while the daemon starts (incfs.preconnect
    # opens them for an http(s) URL, nothing for any other source), started
    # before anything here imports the sources (and trio with them, ~60 ms)
    early_env, early_fds = preconnect.open_early(config.source, DEFAULTS.warm_connections)
    try:
        with open(log_path, "ab") as log_file:
            module, name = _background_entry(config)
            if fork:
                proc = _fork_background(config, module, name, args, log_file.fileno(),
                                        early_env, write_end, early_fds, early_child)
            else:
                proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                        pass_fds=(write_end, *early_fds),
                                        stdin=subprocess.DEVNULL,
                                        stdout=log_file, stderr=log_file,
                                        start_new_session=True,
                                        env={**os.environ, **early_env} if early_env else None)
    finally:
        os.close(write_end)
        preconnect.close_fds(early_fds)
    deadline = time.monotonic() + ready_timeout
    try:
        line = _read_line(read_end, deadline)
    finally:
        os.close(read_end)
    if line == "READY":
        return
    if line is None:
        _kill_daemon(proc, config.mountpoint)
        raise IncfsError(f"the mount daemon (pid {proc.pid}) did not get ready within "
                         f"{ready_timeout:g} s; "
                         f"it was killed (log: {log_path})")
    try:  # it said why it failed (or closed the pipe): it is on its way out
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_daemon(proc, config.mountpoint)
    remove_runtime_dir(config.mountpoint)
    if line.startswith("ERROR "):
        kind, _, message = line[6:].partition(" ")
        raise (IntegrityError if kind == "integrity" else IncfsError)(message)
    raise IncfsError(f"mount daemon exited with status {proc.returncode} (log: {log_path})")


def _background_entry(config: MountConfig) -> tuple[str, str]:
    """The module a background mount runs, and that process's name."""
    from .forked import DAEMON_NAME, SUPERVISOR_NAME

    return ("incfs.supervisor", SUPERVISOR_NAME) if config.supervise else \
        ("incfs.mount", DAEMON_NAME)


def _fork_background(config: MountConfig, module: str, name: str, args: list[str], log_fd: int,
                     env: dict[str, str], ready_fd: int, early: list[int],
                     early_child: Callable[..., Forked | None] | None):
    """`python -m MODULE ARGS`, forked, with `env` added to its environment
    and no descriptor of ours but the ready pipe's, the early connections
    and the log as its output: run by `early_child` (an EarlyChild's `run`:
    the child the command forked before it parsed), if it is still there."""
    from .forked import fork_call

    keep = (ready_fd, *early)
    if early_child is not None:
        proc = early_child(module, args, name=name, output=log_fd, keep=keep, env=env,
                           config=config, early=early)
        if proc is not None:
            return proc
    os.environ.update(env)  # the forked child's, not ours
    try:
        return fork_call(module, args, name=name, new_session=True, output=log_fd, keep=keep)
    finally:
        for key in env:
            os.environ.pop(key, None)


def _read_line(fd: int, deadline: float) -> str | None:
    """One line from the ready pipe: "" at end of file, None at the deadline."""
    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not poller.poll(min(left, 1.0) * 1000):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace").strip()


def _kill_daemon(proc: subprocess.Popen | Forked, mountpoint: str) -> None:
    """SIGKILL a daemon that never got ready (its whole process group: it runs
    in its own session), reap it, and detach a mount it may have made."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    entry = kmount.mount_at(mountpoint)
    if entry is not None and entry.is_fuse:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remove_runtime_dir(mountpoint, leftovers=True)


def umount(mountpoint: str, timeout: float = 60.0, grace: float = 10.0) -> None:
    """Unmount and wait until the daemon has flushed and exited.

    If the kernel keeps the FUSE connection open after the unmount (a copy of
    the mount lives on in another mount namespace), the daemon would never
    hear about it; after `grace` seconds it gets SIGTERM, and finding itself
    unmounted it closes its /dev/fuse fd, which aborts exactly its own
    connection (every acknowledged fill is already on disk). (Aborting
    through fusectl by connection number instead races: the number is freed
    with the superblock and may already name a newer mount.) A daemon still
    alive after `timeout` seconds is killed and the unmount fails with an
    error that says so."""
    entry = kmount.mount_at(mountpoint)
    if entry is None:
        raise UsageError(f"{mountpoint} is not mounted")
    rundir = runtime_dir(mountpoint)
    pid = _read_pid(rundir / "pid") if entry.is_fuse else None
    # the supervisor removes the runtime directory after its daemon is gone:
    # umount gives it a moment (SUPERVISOR_GRACE) to do so, no more (one
    # backing off from daemons that cannot start ends on its own)
    supervisor = _read_pid(rundir / "supervisor.pid") if entry.is_fuse else None
    # after a hand-off the mount is a kernel EROFS one: plain umount
    command = ["fusermount3", "-u", mountpoint] if entry.is_fuse else ["umount", mountpoint]
    # a reference held only for an instant (a stat() in flight, such as the
    # daemon's own readahead tuning right after READY) makes the unmount fail
    # with EBUSY: try again for a moment before calling the mount busy
    busy_until = time.monotonic() + 1.0
    while True:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            break
        if "busy" not in done.stderr.lower() or time.monotonic() > busy_until:
            raise OSError(errno.EBUSY, done.stderr.strip() or f"{command[0]} -u failed")
        time.sleep(0.1)
    if not pid:
        return
    aborted = False
    gone = wait_gone(pid, grace)
    if not gone:
        aborted = _signal_daemon(pid, signal.SIGTERM)
        gone = wait_gone(pid, max(0.0, timeout - grace))
    if gone:
        _wait_exit(supervisor, SUPERVISOR_GRACE)
        return
    killed = _kill_stuck_daemon(pid)
    if killed:
        remove_runtime_dir(mountpoint, leftovers=True)
    raise IncfsError(
        f"{mountpoint} was unmounted, but its daemon (pid {pid}) had not exited "
        f"{timeout:g} s later" + ("" if aborted else " (it could not be signalled)")
        + ("; it was killed (every acknowledged block was already on disk)" if killed
           else "; it could not be killed"))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _wait_exit(pid: int | None, seconds: float) -> None:
    """Give an incfs process (a pid file's: it may name another by now) up
    to `seconds` to end."""
    if pid and runs_module(pid):
        wait_gone(pid, seconds)


def _signal_daemon(pid: int, sig: int) -> bool:
    """Signal an incfs daemon, never a process that merely reuses its pid."""
    if not runs_module(pid):
        return False
    try:
        os.kill(pid, sig)
        return True
    except OSError:
        return False


def _kill_stuck_daemon(pid: int, wait: float = 10.0) -> bool:
    """SIGKILL an incfs daemon; True once it is gone."""
    if not _signal_daemon(pid, signal.SIGKILL):
        return not process_alive(pid)
    return wait_gone(pid, wait)


def main(argv: list[str]) -> int:
    """python -m incfs.mount CONFIG [READY_FD|-] [--handover FD | --resume FD STATE]"""
    config = MountConfig(**json.loads(argv[0]))
    ready_fd = int(argv[1]) if len(argv) > 1 and argv[1] != "-" else None
    succession = None
    if len(argv) > 3 and argv[2] == "--handover":
        succession = Succession(handover_fd=int(argv[3]))
    elif len(argv) > 4 and argv[2] == "--resume":
        state = json.loads(argv[4])
        succession = Succession(resume_fd=int(argv[3]), connection=state["connection"],
                                restarts=int(state["restarts"]))
    from .forked import DAEMON_NAME, EARLY_STARTED_ENV, WARM_STARTED_ENV, set_name

    startup.importing()  # until _open_and_serve has imported what serving needs
    set_name(DAEMON_NAME)
    succession = succession or Succession()
    succession.warm = os.environ.pop(WARM_STARTED_ENV, None) is not None
    succession.early = os.environ.pop(EARLY_STARTED_ENV, None) is not None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request at INFO: a line per MiB fetched would bury
    # what the log is for (errors, retries, restarts)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return run_foreground(config, ready_fd, succession)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
