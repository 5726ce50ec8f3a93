"""Mounting: wires an Image, the Service, FUSE, the control server and (for
remote sources) the built-in loader together, and runs them in one trio loop.

`incfs mount` without --foreground starts this module as a child process and
returns once the child reports that the mount is ready (or why it is not).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyfuse3
import trio

from .errors import CorruptImage, IncfsError, IntegrityError, UsageError
from .fusefs import IncfsOperations, invalidator
from .image import Image
from .integrity import signing
from .loader import DEFAULTS, default_cache, open_cache, start_loader
from .service import Service
from .sources import is_remote as _remote_spec
from .waits import process_alive

log = logging.getLogger("incfs.mount")
READY_TIMEOUT = 120.0
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


def is_remote(source: str) -> bool:
    """Whether the source is read over the network (the sources registry
    knows each backend's schemes)."""
    return _remote_spec(source)


def runtime_dir(mountpoint: str) -> Path:
    """Per-mount directory (0700) for the control socket and the pid file."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "/tmp")
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return Path(base) / f"incfs-{os.geteuid()}" / key


def open_backing(config: MountConfig) -> Image:
    """The backing image for a mount, checked against the key policy."""
    if config.source == "empty":
        path = Path(config.cache) if config.cache else default_cache(config)
        image = Image.open(path, writable=True) if path.exists() else Image.create(path)
    elif is_remote(config.source) or config.cache:
        image = open_cache(config)  # the built-in loader owns caches of sources
    else:
        path = Path(config.source)
        if not path.exists():
            raise UsageError(f"{path}: no such image")
        image = Image.open(path, writable=os.access(path, os.W_OK))
    try:
        check_trust(image, config)
    except BaseException:
        image.close()
        raise
    return image


def check_trust(image: Image, config: MountConfig) -> None:
    if config.key:
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


async def serve(config: MountConfig, image: Image, ready=None) -> None:
    """Run the mount until it is unmounted (or SIGTERM/SIGINT)."""
    from .control.server import ControlServer

    rundir = runtime_dir(config.mountpoint)
    service = Service(image, config.read_timeout)
    control = ControlServer(service, rundir / "control.sock", os.getuid())
    listener = control.listen()
    ops = IncfsOperations(service, str(control.path))
    options = set(pyfuse3.default_options) | {"fsname=incfs", "subtype=incfs", "ro"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, config.mountpoint, options)
    service.invalidate = invalidator()
    service.invalidate_now = invalidator(wait=True)
    (rundir / "pid").write_text(f"{os.getpid()}\n")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, listener)
            loader = _start_loader(config, service, nursery)
            nursery.start_soon(_unmount_on_signal, config.mountpoint)
            # stat() of the mount point is served by this very loop: never
            # call it on the trio thread
            readahead = READAHEAD_COMPLETE_KB if service.status()["complete"] else READAHEAD_LOADING_KB
            nursery.start_soon(trio.to_thread.run_sync, _tune_readahead, config.mountpoint,
                               readahead)
            if ready:
                ready()
            await pyfuse3.main(max_tasks=config.max_tasks)
            if loader is not None:
                await loader.aclose()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=False)
        for leftover in (rundir / "pid", control.path):
            leftover.unlink(missing_ok=True)


def _start_loader(config: MountConfig, service: Service, nursery):
    if not (is_remote(config.source) or (config.cache and config.source != "empty")):
        return None
    return start_loader(config, service, nursery)


async def _unmount_on_signal(mountpoint: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return


def _tune_readahead(mountpoint: str, kb: int) -> None:
    """Set the mount's readahead window (root only; best effort): large when
    every block is local (the daemon is CPU-bound, and more requests in flight
    keep both cores busy), 1 MiB while loading (each readahead request past
    what a program needs would be fetched over the network)."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        path.write_text(str(kb))
    except OSError:
        pass


# --- running in the foreground or as a background child ----------------------

def run_foreground(config: MountConfig, ready_fd: int | None = None) -> int:
    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, b"READY\n")
            os.close(ready_fd)

    try:
        _check_mountpoint(config.mountpoint)
        image = open_backing(config)
    except (IncfsError, OSError) as e:
        _report_failure(ready_fd, e)
        return 2 if isinstance(e, UsageError) else 1
    try:
        trio.run(serve, config, image, ready)
    except (IncfsError, OSError, RuntimeError) as e:
        _report_failure(ready_fd, e)
        return 1
    finally:
        image.close()
    return 0


def _report_failure(ready_fd: int | None, e: BaseException) -> None:
    message = _describe(e)
    if ready_fd is not None:
        # the kind travels with the message so the parent exits as the
        # child would have (1 for integrity, 2 for usage)
        kind = "integrity" if isinstance(e, (IntegrityError, CorruptImage)) else "usage"
        try:
            os.write(ready_fd, f"ERROR {kind} {message}\n".encode())
        except OSError:
            pass
    else:
        print(f"incfs: {message}", file=sys.stderr)


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


def mount_background(config: MountConfig) -> None:
    """Start the daemon and return once the mount is ready."""
    _check_mountpoint(config.mountpoint)
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "incfs.mount", json.dumps(asdict(config)), str(write_end)]
    log_path = runtime_dir(config.mountpoint).parent / "daemon.log"
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.readline().decode(errors="replace").strip()
    if line == "READY":
        return
    proc.wait(timeout=READY_TIMEOUT)
    if line.startswith("ERROR "):
        kind, _, message = line[6:].partition(" ")
        raise (IntegrityError if kind == "integrity" else IncfsError)(message)
    raise IncfsError(f"mount daemon exited with status {proc.returncode} (log: {log_path})")


def umount(mountpoint: str, timeout: float = 60.0, grace: float = 10.0) -> None:
    """Unmount and wait until the daemon has flushed and exited.

    If the kernel keeps the FUSE connection open after the unmount (a copy of
    the mount lives on in another mount namespace), the daemon would never
    hear about it; after `grace` seconds the connection is aborted, which
    ends the daemon cleanly (every acknowledged fill is already on disk)."""
    pid_file = runtime_dir(mountpoint) / "pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    if not os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint} is not mounted")
    connection = os.minor(os.stat(mountpoint).st_dev) if pid else None
    # after a hand-off the mount is a kernel EROFS one: plain umount
    command = ["fusermount3", "-u", mountpoint] if pid else ["umount", mountpoint]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(errno.EBUSY, done.stderr.strip() or "fusermount3 -u failed")
    if not pid:
        return
    started = time.monotonic()
    aborted = False
    while time.monotonic() - started < timeout and process_alive(pid):
        if not aborted and time.monotonic() - started > grace:
            aborted = _abort_connection(connection)
        time.sleep(0.05)


def _abort_connection(connection: int | None) -> bool:
    try:
        Path(f"/sys/fs/fuse/connections/{connection}/abort").write_text("1")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    config = MountConfig(**json.loads(argv[0]))
    ready_fd = int(argv[1]) if len(argv) > 1 else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_foreground(config, ready_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
