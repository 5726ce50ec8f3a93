"""Does a mount show exactly the tree it was packed from? Compared through
the file system only (lstat, readlink, listxattr/getxattr, file bytes), as
`diff -r`, `stat -c '%u %g %a %t %T %F'` and `getfattr -d -m -` would see it,
plus hard links: names that share an inode in the tree share one in the mount.

    python bench/fidelity.py TREE MOUNTPOINT
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys

# incfs's own attributes are readable by name but never listed; the mount's
# hidden .incfs directory is looked up, never listed, so walks do not see it
_SKIP_XATTR_PREFIX = "user.incfs."


def xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names
            if not n.startswith(_SKIP_XATTR_PREFIX)}


def _digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _describe(path: str) -> tuple:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (stat.S_IFCHR, stat.S_IFBLK) else None
    size = st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, dev, size, st.st_mtime_ns)


def compare(tree: str, mount: str) -> list[str]:
    """Every difference between the tree and the mount (empty: identical)."""
    problems: list[str] = []
    links_tree: dict[tuple[int, int], str] = {}
    links_mount: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = os.path.relpath(dirpath, tree)
        mdir = os.path.normpath(os.path.join(mount, rel_dir))
        try:
            listed = set(os.listdir(mdir))
        except OSError as e:
            problems.append(f"{rel_dir}: cannot list in the mount: {e.strerror}")
            continue
        names = set(dirnames) | set(filenames)
        problems += [f"{os.path.join(rel_dir, n)}: missing in the mount" for n in names - listed]
        problems += [f"{os.path.join(rel_dir, n)}: only in the mount" for n in listed - names]
        for name in sorted(names & listed):
            problems += _compare_entry(os.path.join(dirpath, name), os.path.join(mdir, name),
                                       os.path.join(rel_dir, name), links_tree, links_mount)
    return problems


def _compare_entry(t: str, m: str, rel: str, links_tree: dict, links_mount: dict) -> list[str]:
    out = []
    want, got = _describe(t), _describe(m)
    if want != got:
        out.append(f"{rel}: (type, mode, uid, gid, dev, size, mtime) {got} != {want}")
    if xattrs(t) != xattrs(m):
        out.append(f"{rel}: extended attributes differ")
    kind = want[0]
    if kind == stat.S_IFLNK and os.readlink(t) != os.readlink(m):
        out.append(f"{rel}: symlink target differs")
    if kind == stat.S_IFREG and want == got and _digest(t) != _digest(m):
        out.append(f"{rel}: content differs")
    if kind != stat.S_IFDIR:
        ts, ms = os.lstat(t), os.lstat(m)
        if ts.st_nlink > 1 or ms.st_nlink > 1:
            first_t = links_tree.setdefault((ts.st_dev, ts.st_ino), rel)
            first_m = links_mount.setdefault(ms.st_ino, rel)
            if first_t != first_m:
                out.append(f"{rel}: hard link group differs ({first_t} vs {first_m})")
    return out


def diff_r(tree: str, mount: str) -> str:
    """`diff -r --no-dereference` output (empty when the trees agree)."""
    done = subprocess.run(["diff", "-r", "--no-dereference", tree, mount],
                          capture_output=True, text=True)
    return done.stdout + done.stderr


def _listing(root: str, argv: list[str]) -> list[str]:
    """`argv` run on every entry under `root` (find -exec, as a user would),
    its output with `root` taken out of each line, sorted."""
    done = subprocess.run(["find", root, "-exec", *argv, "{}", "+"], capture_output=True)
    text = done.stdout.decode(errors="surrogateescape").replace(root, "ROOT")
    return sorted(line for line in text.splitlines() if line)


def tool_differences(tree: str, mount: str) -> list[str]:
    """The literal tools of the issue on both sides: `stat -c '%n %u %g %a %t
    %T %F'` and `getfattr -h -d -m - -e hex` (package attr) of every entry;
    the lines that differ. getfattr missing: one line saying so."""
    out = []
    argv = {"stat": ["stat", "-c", "%n %u %g %a %t %T %F"],
            "getfattr": ["getfattr", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"]}
    for tool, command in argv.items():
        if shutil.which(tool) is None:
            package = "attr" if tool == "getfattr" else "coreutils"
            out.append(f"{tool}: not installed (apt-get install {package})")
            continue
        a, b = _listing(tree, command), _listing(mount, command)
        if a != b:
            extra = sorted(set(a) ^ set(b))
            out += [f"{tool}: {line}" for line in extra[:20]] or [f"{tool}: line order differs"]
    return out


def main() -> int:
    tree, mount = sys.argv[1], sys.argv[2]
    problems = compare(tree, mount) + tool_differences(tree, mount)
    diff = diff_r(tree, mount)
    for p in problems[:40]:
        print(p)
    if diff:
        print(diff[:4000])
    print(f"{len(problems)} differences in metadata, xattrs, links or bytes; diff -r: "
          f"{'clean' if not diff else 'differs'}")
    return 1 if problems or diff else 0


if __name__ == "__main__":
    sys.exit(main())
