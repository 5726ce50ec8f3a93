"""The `incfs` command line: keygen, pack, inspect, verify, digest; exit
codes; bad input always gives one line on stderr and never a half image."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from conftest import ALGORITHMS, RawImage, run_incfs, source_entries
from incfs import ROOT_INO
from incfs.cli import main
from incfs.image import Image


def _leftovers(directory: Path, name: str) -> list[str]:
    """Files in `directory` that look like a (temporary) image called `name`."""
    return sorted(p.name for p in directory.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def cli_image(small_tree, keys, tmp_path_factory):
    image = tmp_path_factory.mktemp("cli") / "tree.img"
    proc = run_incfs("pack", small_tree, image, "--compress", "lz4",
                     "--sign-key", keys("ed25519")[0])
    assert proc.returncode == 0, proc.stderr
    return image, proc


# --- keygen ----------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ALGORITHMS)
def test_keygen(tmp_path, alg):
    key = tmp_path / "signing"
    proc = run_incfs("keygen", key, "--algorithm", alg)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = tmp_path / "signing.pub"
    public = serialization.load_pem_public_key(pub.read_bytes())
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo) == \
        private.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert alg in proc.stdout and "key id" in proc.stdout


def test_keygen_refuses_to_overwrite(tmp_path, one_line_error):
    key = tmp_path / "k"
    assert run_incfs("keygen", key).returncode == 0
    before = key.read_bytes()
    one_line_error(run_incfs("keygen", key), 2, "already exists")
    assert key.read_bytes() == before
    one_line_error(run_incfs("keygen", tmp_path / "x", "--algorithm", "dsa"), 2, "dsa")


# --- pack --------------------------------------------------------------------------------

def test_pack_prints_one_paragraph(cli_image):
    image, proc = cli_image
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = lines[0]
    assert summary.startswith("Packed 20 files, ")
    assert str(image) in summary and "with lz4" in summary
    assert "Signed with ed25519 key" in summary
    assert re.search(r"\d+ data blocks \(.*all-zero.*deduplicated", summary)
    assert image.exists() and _leftovers(image.parent, ".tmp") == []


def test_pack_progress_bar(small_tree, tmp_path, monkeypatch):
    from rich.console import Console

    import incfs.cli as cli
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "_stderr_console",
                        lambda: Console(file=buffer, force_terminal=True, width=100))
    result = CliRunner().invoke(main, ["pack", str(small_tree), str(tmp_path / "img")])
    assert result.exit_code == 0, result.output
    assert "packing" in buffer.getvalue()  # the bar was drawn (then cleared)
    assert cli._source_bytes(small_tree) == sum(
        {(s.st_dev, s.st_ino): s.st_size for s in source_entries(small_tree).values()
         if stat.S_ISREG(s.st_mode)}.values())


# --- inspect -------------------------------------------------------------------------------

def test_inspect_human(cli_image, keys):
    image, _proc = cli_image
    proc = run_incfs("inspect", image)
    assert proc.returncode == 0 and proc.stderr == ""
    out = proc.stdout
    for needle in ("Format", "incfs 1.2", "packed", "UUID", "Contents", "20 files",
                   "Blocks", "complete", "Stored", "lz4", "zero", "Signature", "ed25519",
                   "Recovery", "clean", "Index", "chunks of 4096 bytes", "map_kinds",
                   "Tree (", "/names/\\xff\\xfe-not-utf8",
                   "/links/sym-rel -> ../one", "with space [and] {brackets}"):
        assert needle in out, needle
    with Image.open(image) as img:
        assert img.signature.entry.key_id.hex() in out.replace("\n", "").replace(" ", "")


def test_inspect_json(cli_image, small_tree):
    image, _proc = cli_image
    proc = run_incfs("inspect", image, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    entries = source_entries(small_tree)
    kinds = [stat.S_IFMT(s.st_mode) for s in entries.values()]
    regular = {(s.st_dev, s.st_ino) for s in entries.values() if stat.S_ISREG(s.st_mode)}
    assert info["format_version"] == "1.2"
    assert info["superblock"]["flag_names"] == ["packed"]
    assert info["superblock"]["packed_size"] == info["file_size"] == image.stat().st_size
    assert info["counts"]["files"] == len(regular)
    assert info["counts"]["directories"] == kinds.count(stat.S_IFDIR) + 1  # and the root
    assert info["counts"]["symlinks"] == kinds.count(stat.S_IFLNK)
    assert info["blocks"]["present"] == info["blocks"]["total"] > 0 and info["complete"]
    index = info["index"]
    assert index["inodes"] == info["counts"]["inodes"] and index["chunk_size"] == 4096
    assert index["chunks"] == (index["bytes"] + 4095) // 4096
    assert index["features"] == ["dtypes", "map_kinds", "chunks"]
    mix = info["compression"]
    assert mix["lz4"]["blocks"] > 0 and mix["zero"]["blocks"] > 0
    assert mix["zero"]["stored_bytes"] == 0 and mix["zstd"]["blocks"] == 0
    assert info["stored_bytes"] == sum(v["stored_bytes"] for v in mix.values())
    assert info["signature"]["algorithm"] == "ed25519"
    assert info["signature"]["root_matches_namespace"] is True
    assert info["recovery"]["clean"] and info["recovery"]["dropped_bytes"] == 0
    assert info["entries_total"] == len(entries) + 1
    assert not info["tree_truncated"] and len(info["tree"]) == info["entries_total"]
    by_path = {e["path"]: e for e in info["tree"]}
    assert by_path["/one"]["size"] == 1 and by_path["/one"]["blocks_total"] == 1
    assert by_path["/exec.sh"]["mode"] == "0755"
    assert by_path["/links/sym-dir"]["target"] == "../deep"
    assert by_path["/text.txt"]["nlink"] == 2


def test_inspect_limits_the_tree(cli_image):
    image, _proc = cli_image
    info = json.loads(run_incfs("inspect", image, "--json", "--limit", "5").stdout)
    assert len(info["tree"]) == 5 and info["tree_truncated"]
    assert info["tree"][0]["path"] == "/"
    proc = run_incfs("inspect", image, "--limit", "3")
    assert "first 3 shown" in proc.stdout


# --- verify and digest -----------------------------------------------------------------

def test_verify_exit_codes(cli_image, keys, tmp_path, one_line_error):
    image, _proc = cli_image
    good = run_incfs("verify", image, "--key", keys("ed25519")[1])
    assert good.returncode == 0 and good.stdout.startswith("OK") and good.stderr == ""
    assert run_incfs("verify", image).returncode == 0
    # 1: an integrity failure
    bad = tmp_path / "bad.img"
    raw = RawImage(image)
    with Image.open(image) as img:
        node = img.ns.lookup(ROOT_INO, b"edge-4096")
        offset = node.data.get(0)[0]
    raw.flip(offset + 10)
    raw.save(bad)
    proc = run_incfs("verify", bad, "--key", keys("ed25519")[1])
    one_line_error(proc, 1, "integrity check failed")
    assert "/edge-4096: data block 0:" in proc.stdout and "FAILED" in proc.stdout
    report = json.loads(run_incfs("verify", bad, "--json").stdout)
    assert report["exit_code"] == 1 and report["integrity_failures"] == 1
    assert report["problems"][-1]["path"] == "/edge-4096"
    # 2: usage and I/O errors
    one_line_error(run_incfs("verify", tmp_path / "missing.img"), 2, "cannot open")
    one_line_error(run_incfs("verify", tmp_path), 2)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(10000))
    one_line_error(run_incfs("verify", junk), 2, "not an incfs image")
    one_line_error(run_incfs("verify", image, "--key", junk), 2, "not a PEM public key")
    one_line_error(run_incfs("verify", image, "--key", tmp_path / "nokey"), 2, "cannot read key")
    one_line_error(run_incfs("verify"), 2, "Missing argument")


def test_verify_damaged_superblock_is_an_integrity_failure(cli_image, tmp_path, one_line_error):
    image, _proc = cli_image
    raw = RawImage(image)
    raw.flip(40)  # meta_end: the superblock CRC no longer matches
    damaged = raw.save(tmp_path / "damaged.img")
    proc = run_incfs("verify", damaged)
    one_line_error(proc, 1)
    assert "superblock checksum" in proc.stdout
    one_line_error(run_incfs("inspect", damaged), 1, "superblock checksum")


def test_digest_prints_only_the_digest(cli_image, small_tree):
    import subprocess
    image, _proc = cli_image
    proc = run_incfs("digest", image, "text.txt")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", proc.stdout) and proc.stderr == ""
    want = subprocess.run(["fsverity", "digest", str(small_tree / "text.txt")],
                          capture_output=True, text=True, check=True).stdout.split()[0]
    assert proc.stdout.strip() == want
    nonascii = run_incfs("digest", image, "/names/\u00fcmlaut-\u00df")
    assert nonascii.returncode == 0 and nonascii.stdout.startswith("sha256:")


# --- bad input ----------------------------------------------------------------------------

def test_pack_bad_sources(tmp_path, small_tree, one_line_error):
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(run_incfs("pack", tmp_path / "missing", out / "a.img"), 2, "not a directory")
    one_line_error(run_incfs("pack", small_tree / "one", out / "a.img"), 2, "not a directory")
    one_line_error(run_incfs("pack", small_tree, tmp_path / "no" / "dir" / "a.img", cwd=out), 2)
    one_line_error(run_incfs("pack", small_tree, out / "a.img", "--compress", "gzip"), 2,
                   "--compress")
    one_line_error(run_incfs("pack", small_tree), 2, "Missing argument")
    assert list(out.iterdir()) == []


def test_pack_unreadable_source_as_user(sample_tree, one_line_error):
    """An unreadable source file: one line, exit 2, nothing left behind. Root
    reads files whatever their mode, so the command runs as nobody."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="incfs-nobody-", dir="/tmp"))
    try:
        work.chmod(0o777)
        src = work / "src"
        shutil.copytree(sample_tree(big=0, deep=2), src, symlinks=True)
        for p in [src, *src.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o777 if p.is_dir() else 0o644)
        (src / "one").chmod(0)
        proc = _run_cli_as_nobody(["pack", str(src), str(work / "a.img")], work / "stderr")
        one_line_error(proc, 2, "cannot read")
        assert _leftovers(work, "a.img") == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_cli_as_nobody(args: list[str], stderr_path: Path):
    """Run the CLI in a forked child that dropped to uid/gid 65534 (the venv's
    interpreter lives under /root, which nobody cannot exec, so no exec)."""
    import subprocess
    import sys

    import rich.progress  # noqa: F401  (lazy imports would fail once we are nobody)

    from incfs.cli import main

    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", closefd=False)  # pytest replaced sys.stderr
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), "",
                                       stderr_path.read_text())


def test_pack_unreadable_file_midway(tmp_path, sample_tree, monkeypatch):
    """A read error after the temporary image exists: one line, exit 2, and
    neither the image nor its temporary file is left behind."""
    src = sample_tree(big=0, deep=2)
    real_open = open

    def failing_open(file, *args, **kwargs):
        if str(file).endswith("exec.sh"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr("builtins.open", failing_open)
    result = CliRunner().invoke(main, ["pack", str(src), str(out / "a.img")])
    monkeypatch.undo()
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read" in lines[0] and "exec.sh" in lines[0]
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_pack_target_exists(tmp_path, small_tree, one_line_error):
    target = tmp_path / "a.img"
    target.write_bytes(b"precious")
    one_line_error(run_incfs("pack", small_tree, target), 2, "already exists")
    assert target.read_bytes() == b"precious"
    assert _leftovers(tmp_path, "a.img") == ["a.img"]


def test_pack_wrong_keys(tmp_path, small_tree, keys, one_line_error):
    _priv, pub = keys("ed25519")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(os.urandom(300))
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    locked = tmp_path / "locked.pem"
    locked.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    target = tmp_path / "a.img"
    for key, message in [(pub, "not an unencrypted PEM private key"),
                         (junk, "not an unencrypted PEM private key"),
                         (locked, "not an unencrypted PEM private key"),
                         (p384, "unsupported curve"),
                         (tmp_path / "missing.pem", "cannot read key")]:
        one_line_error(run_incfs("pack", small_tree, target, "--sign-key", key), 2, message)
        assert _leftovers(tmp_path, "a.img") == []


def test_pack_bad_base_and_profile(tmp_path, small_tree, one_line_error):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an image at all" * 300)
    target = tmp_path / "a.img"
    one_line_error(run_incfs("pack", small_tree, target, "--base", junk), 2, "not an incfs image")
    one_line_error(run_incfs("pack", small_tree, target, "--profile", junk), 2,
                   "not an incfs profile")
    one_line_error(run_incfs("pack", small_tree, target, "--profile", tmp_path / "nope"), 2,
                   "cannot read profile")
    assert _leftovers(tmp_path, "a.img") == []


@pytest.mark.parametrize("command", ["inspect", "verify", "digest"])
def test_non_images_are_usage_errors(tmp_path, command, one_line_error):
    extra = ["/x"] if command == "digest" else []
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    text = tmp_path / "text"
    text.write_text("hello\n" * 1000)
    for target, message in [(empty, "not an incfs image"), (text, "not an incfs image"),
                            (tmp_path / "missing", "cannot open"), (tmp_path, "")]:
        one_line_error(run_incfs(command, target, *extra), 2, message or None)


def test_group_level_errors(one_line_error):
    one_line_error(run_incfs(), 2, "missing command")
    one_line_error(run_incfs("frobnicate"), 2, "No such command")
    one_line_error(run_incfs("inspect", "--bogus", "x"), 2, "No such option")
    proc = run_incfs("--help")
    assert proc.returncode == 0
    for command in ("keygen", "pack", "inspect", "verify", "digest"):
        assert command in proc.stdout


def test_internal_errors_are_one_line(monkeypatch, tmp_path):
    import incfs.verify

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(incfs.verify, "describe_image", boom)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "x")])
    assert result.exit_code == 3
    assert result.stderr.strip() == "incfs: error: internal error: RuntimeError: simulated bug"
