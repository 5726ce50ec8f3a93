"""mount(8) and umount(8) helpers: `mount -t incfs SOURCE DIR -o OPTIONS`,
/etc/fstab lines of type incfs, and `umount DIR`.

mount(8) runs `/sbin/mount.incfs SOURCE DIR [-sfnv] [-N NS] [-o OPTIONS]`;
umount(8) runs `/sbin/umount.fuse.incfs DIR [-nlfvr] [-N NS] [-t TYPE]` for a
mount of type fuse.incfs. `install` writes both as two-line shell scripts
that run this module with the venv's Python (`make setup` calls it as root):

    python -m incfs.mount_helper install [--sbin /usr/sbin] [--python PATH]

OPTIONS are the long options of `incfs mount` written mount-style:
`key=/etc/incfs/app.pub,cache=/var/cache/incfs/app.img,read_timeout=30,
allow_unsigned` (an underscore or a dash, either works; `mirror=` may be
repeated). The generic options mount(8) and systemd pass on (rw, ro,
defaults, noauto, nofail, _netdev, user, x-systemd.*, ...) are ignored; an
unknown option is an error (exit 1), unless mount was given -s (sloppy).

Exit codes are mount(8)'s: 0 mounted, 1 bad invocation, 32 mount failure.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
from pathlib import Path

import click

EXIT_OK, EXIT_USAGE, EXIT_SYSTEM, EXIT_FAILURE = 0, 1, 2, 32

# options of mount(8), the kernel and systemd that mean nothing to incfs (it
# is always read-only, nosuid and nodev are the FUSE defaults for others)
GENERIC = {"rw", "ro", "defaults", "auto", "noauto", "user", "nouser", "users", "owner",
           "group", "_netdev", "nofail", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
           "sync", "async", "atime", "noatime", "relatime", "norelatime", "strictatime",
           "nodiratime", "diratime", "lazytime", "nolazytime", "silent", "loud", "iversion",
           "noiversion", "mand", "nomand", "dirsync", "remount", "bind", "nofail"}
GENERIC_PREFIXES = ("x-", "uhelper=", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=",
                    "X-", "helper=")
NOT_FROM_MOUNT = {"foreground"}  # mount(8) must return once the mount is ready


class HelperError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _mount_options() -> dict[str, click.Option]:
    """The long options of `incfs mount`, by name with underscores."""
    from .cli import main

    command = main.commands["mount"]
    out = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in NOT_FROM_MOUNT:
            for opt in param.opts:
                if opt.startswith("--"):
                    out[opt[2:].replace("-", "_")] = param
    return out


def split_options(text: str) -> list[str]:
    """mount's comma-separated option list; a value may be quoted ("...")
    to hold commas."""
    out, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            if current:
                out.append(current)
            current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out


def options_to_args(options: list[str], sloppy: bool = False) -> list[str]:
    """mount-style options -> `incfs mount` command-line arguments."""
    known = _mount_options()
    args: list[str] = []
    for item in options:
        name, eq, value = item.partition("=")
        if item in GENERIC or name in GENERIC or item.startswith(GENERIC_PREFIXES):
            continue
        param = known.get(name.replace("-", "_"))
        if param is None:
            if sloppy:
                continue
            raise HelperError(f"unknown option {name!r} (see `incfs mount --help`; "
                              f"write --read-timeout as read_timeout=...)")
        flag = next(o for o in param.opts if o.startswith("--"))
        if param.is_flag:
            if eq and value.lower() not in ("1", "yes", "true", "on"):
                if value.lower() in ("0", "no", "false", "off"):
                    continue
                raise HelperError(f"option {name!r} is a flag: no value")
            args.append(flag)
        else:
            if not eq or value == "":
                raise HelperError(f"option {name!r} needs a value ({name}=...)")
            args += [flag, value]
    return args


def parse_mount_argv(argv: list[str]) -> tuple[str, str, list[str], dict]:
    """SOURCE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE] (flags may come
    anywhere: mount(8) puts them after the two names, people may not)."""
    positional, options, flags = [], [], {"sloppy": False, "fake": False, "verbose": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "-t", "-N") or (arg.startswith(("-o", "-t", "-N")) and len(arg) > 2
                                          and not arg.startswith("--")):
            value = arg[2:] if len(arg) > 2 else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise HelperError(f"{arg} needs a value")
            i += 1 if len(arg) > 2 else 2
            if arg[:2] == "-o":
                options += split_options(value)
            elif arg[:2] == "-N":
                raise HelperError("-N (another mount namespace) is not supported")
            continue
        if arg.startswith("-") and len(arg) > 1:
            flags["sloppy"] |= "s" in arg
            flags["fake"] |= "f" in arg
            flags["verbose"] |= "v" in arg
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise HelperError("usage: mount.incfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]")
    return positional[0], positional[1], options, flags


def _absolute_source(source: str) -> str:
    """The daemon may run from any directory: local image paths are made
    absolute (URLs and 'empty' are kept)."""
    if source == "empty" or "://" in source:
        return source
    return os.path.abspath(source)


def mount_main(argv: list[str]) -> int:
    try:
        source, mountpoint, options, flags = parse_mount_argv(argv)
        args = ["mount", _absolute_source(source), os.path.abspath(mountpoint),
                *options_to_args(options, sloppy=flags["sloppy"])]
    except HelperError as e:
        print(f"mount.incfs: {e}", file=sys.stderr)
        return e.code
    if flags["verbose"]:
        print("mount.incfs: incfs " + shlex.join(args), file=sys.stderr)
    if flags["fake"]:
        return EXIT_OK
    # mount(8) is silent on success: the "mounted ..." line only with -v
    with contextlib.redirect_stdout(sys.stdout if flags["verbose"] else io.StringIO()):
        code = _run_cli(args)
    return EXIT_OK if code == 0 else EXIT_FAILURE


def umount_main(argv: list[str]) -> int:
    """umount.fuse.incfs DIR [-nlfvr] [-N NS] [-t TYPE]: a clean unmount that
    waits for the daemon to flush and exit, like `incfs umount`; -l detaches
    lazily (programs holding files keep reading until they close them)."""
    targets, lazy, force = [], False, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-t", "-N"):
            if arg == "-N":
                print("umount.incfs: -N is not supported", file=sys.stderr)
                return EXIT_USAGE
            i += 2
            continue
        if arg.startswith("-") and len(arg) > 1:
            lazy |= "l" in arg
            force |= "f" in arg
        else:
            targets.append(arg)
        i += 1
    if len(targets) != 1:
        print("usage: umount.fuse.incfs MOUNTPOINT [-nlfvr]", file=sys.stderr)
        return EXIT_USAGE
    target = targets[0]
    if lazy or force:
        from . import kmount

        entry = kmount.mount_at(target)
        if force and entry is not None:
            kmount.abort_fuse_connection(entry.minor)
        try:
            kmount.umount2(target, kmount.MNT_DETACH if lazy else 0)
        except OSError as e:
            print(f"umount.incfs: {e.strerror}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    return EXIT_OK if _run_cli(["umount", target]) == 0 else EXIT_FAILURE


def _run_cli(args: list[str]) -> int:
    from .cli import main

    try:
        main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# --- installing the helpers ------------------------------------------------------

HELPERS = {"mount.incfs": "mount", "umount.fuse.incfs": "umount"}


def helper_script(kind: str, python: str) -> str:
    return ("#!/bin/sh\n"
            f"# incfs {kind}(8) helper, written by `python -m incfs.mount_helper install`\n"
            f"# (make setup); see docs/operations.md\n"
            f'exec {shlex.quote(python)} -m incfs.mount_helper {kind} "$@"\n')


def install(sbin: str = "/usr/sbin", python: str | None = None) -> list[Path]:
    python = python or sys.executable
    written = []
    for name, kind in HELPERS.items():
        path = Path(sbin) / name
        text = helper_script(kind, python)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("mount", "umount", "install"):
        print("usage: python -m incfs.mount_helper mount|umount|install ...", file=sys.stderr)
        return EXIT_USAGE
    if argv[0] == "mount":
        return mount_main(argv[1:])
    if argv[0] == "umount":
        return umount_main(argv[1:])
    sbin, python = "/usr/sbin", None
    rest = argv[1:]
    while rest:
        if rest[0] == "--sbin" and len(rest) > 1:
            sbin, rest = rest[1], rest[2:]
        elif rest[0] == "--python" and len(rest) > 1:
            python, rest = rest[1], rest[2:]
        else:
            print(f"install: unexpected {rest[0]!r}", file=sys.stderr)
            return EXIT_USAGE
    for path in install(sbin, python):
        print(f"incfs: installed {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
