"""A real unprivileged user for tests (issue 12, item 3): created once with
useradd (idempotent), given a venv it can run, and used through `runuser`.

Why a venv of its own: the project's venv (.venv) is a venv of pyenv's
Python under /root (mode 0700), so a normal user cannot exec its
interpreter (`.venv/bin/python` is a symlink into /root/.pyenv). The user's
venv is made from Debian's /usr/bin/python3 (the same 3.11 ABI) with
`--without-pip`, and a .pth file puts the code under test (this checkout's
src/, found through `incfs.__file__`) and the project venv's site-packages
(world-readable) on its path; bin/incfs is a three-line script. Nothing is
installed or copied.

Use from a test module: `from unprivileged import normal_user, dev_fuse_mode`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

import incfs

USER = "incfs-tester"
SYSTEM_PYTHON = "/usr/bin/python3"
DEV_FUSE = "/dev/fuse"


@dataclass
class NormalUser:
    name: str
    uid: int
    gid: int
    home: Path
    venv: Path

    @property
    def incfs(self) -> str:
        return str(self.venv / "bin" / "incfs")

    def env(self) -> dict:
        """A clean environment, as after a login (no PYTHONPATH, no root HOME)."""
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "INCFS_WARM": "0"}  # no warm process left behind by the tests (see conftest)

    def run(self, *args, check: bool = True, timeout: float = 120,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command as this user (runuser: no PAM password, no tty)."""
        cmd = ["runuser", "-u", self.name, "--", "env", "-i",
               *(f"{k}={v}" for k, v in self.env().items()), *map(os.fspath, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.home)
        if check:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def make_dir(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path


def ensure_user(name: str = USER) -> pwd.struct_passwd:
    """The user, made with useradd if it does not exist yet."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    done = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh",
                           "--comment", "incfs tests (unprivileged)", name],
                          capture_output=True, text=True)
    if done.returncode not in (0, 9):  # 9: made meanwhile by someone else
        raise RuntimeError(f"useradd {name}: {done.stderr.strip()}")
    return pwd.getpwnam(name)


def project_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def make_user_venv(user: pwd.struct_passwd) -> Path:
    """A venv the user can run (see the module docstring); rebuilt when the
    code under test moved."""
    src = Path(incfs.__file__).resolve().parent.parent
    venv = Path(user.pw_dir) / "incfs-venv"
    pth_text = f"{src}\n{project_site_packages()}\n"
    pth = next(venv.glob("lib/python3*/site-packages/incfs-under-test.pth"), None)
    if not (pth and pth.read_text() == pth_text and (venv / "bin" / "incfs").exists()):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
        pth = next((venv / "lib").glob("python3*")) / "site-packages" / "incfs-under-test.pth"
        pth.write_text(pth_text)
        script = venv / "bin" / "incfs"
        script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom incfs.cli import main\n"
                          "sys.exit(main())\n")
        script.chmod(0o755)
        for p in [venv, *venv.rglob("*")]:
            if not p.is_symlink():
                os.chown(p, 0, 0)  # the user runs it but cannot change it
    return venv


def readable_by_others(path: str | os.PathLike) -> list[str]:
    """The directories on the way to `path` that others cannot search."""
    blocked = []
    p = Path(path).resolve()
    for parent in [*reversed(p.parents), p]:
        mode = os.stat(parent).st_mode
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            blocked.append(str(parent))
    return blocked


@contextlib.contextmanager
def searchable(dirs: list[str]):
    """Let others pass through (o+x, search only: no listing, no reading)
    directories on the way to the code under test, for as long as the
    user's tests run; the modes are put back after."""
    saved = {d: stat.S_IMODE(os.stat(d).st_mode) for d in dirs}
    try:
        for d, mode in saved.items():
            os.chmod(d, mode | stat.S_IXOTH)
        yield
    finally:
        for d, mode in saved.items():
            os.chmod(d, mode)


@pytest.fixture(scope="session")
def normal_user() -> NormalUser:
    assert os.geteuid() == 0, "the suite runs as root (make test): making a user needs it"
    # Debian's python3 comes with the project's apt packages (python3-venv)
    assert Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing: run `make setup`"
    blocked = readable_by_others(Path(incfs.__file__).parent) + \
        readable_by_others(project_site_packages())
    with searchable(sorted(set(blocked))):
        user = ensure_user()
        venv = make_user_venv(user)
        yield NormalUser(user.pw_name, user.pw_uid, user.pw_gid, Path(user.pw_dir), venv)


@contextlib.contextmanager
def dev_fuse_mode(mode: int):
    """Set /dev/fuse to `mode`; always back to 0600 after (the machines'
    default: only root opens /dev/fuse, users go through fusermount3)."""
    try:
        os.chmod(DEV_FUSE, mode)
        yield
    finally:
        os.chmod(DEV_FUSE, 0o600)


@pytest.fixture(params=[0o600, 0o666], ids=["dev-fuse-0600", "dev-fuse-0666"])
def fuse_mode(request):
    with dev_fuse_mode(request.param):
        yield request.param
