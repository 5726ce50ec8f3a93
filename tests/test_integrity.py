"""Integrity: fs-verity parity of the Merkle trees, signatures, and tampering
caught by `verify` (and by reads) with the file and block named."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from conftest import ALGORITHMS, MiB, RawImage, block_location, run_incfs
from incfs import BLOCK_SIZE, ROOT_INO
from incfs.errors import IntegrityError
from incfs.format.layout import RecordType
from incfs.format.records import TreeKind
from incfs.image import Image
from incfs.integrity import merkle, signing
from incfs.pack import pack
from incfs.verify import INTEGRITY, verify_image

# --- fs-verity parity ------------------------------------------------------------

PARITY_SIZES = {"size-0": 0, "size-1": 1, "size-4095": 4095, "size-4096": 4096,
                "size-4097": 4097, "size-1MiB+7": MiB + 7, "size-600KiB": 600 * 1024,
                "size-70MB": 70_000_000}
EXPECTED_LEVELS = {"size-0": 0, "size-1": 0, "size-4095": 0, "size-4096": 0,
                   "size-4097": 1, "size-1MiB+7": 2, "size-600KiB": 2, "size-70MB": 3}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    src = tmp_path_factory.mktemp("parity") / "src"
    src.mkdir()
    for name, size in PARITY_SIZES.items():
        with open(src / name, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
    image = src.parent / "parity.img"
    pack(src, image, compress="none")
    return src, image


def _fsverity(path: Path, *extra: str) -> str:
    out = subprocess.run(["fsverity", "digest", *extra, str(path)], check=True,
                         capture_output=True, text=True).stdout
    digest, name = out.split()
    assert name == str(path)
    return digest


@pytest.mark.parametrize("name", list(PARITY_SIZES))
def test_digest_matches_fsverity(parity, name, tmp_path):
    src, image = parity
    want = _fsverity(src / name, f"--out-merkle-tree={tmp_path / 'tree'}",
                     f"--out-descriptor={tmp_path / 'desc'}")
    proc = run_incfs("digest", image, f"/{name}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want + "\n"
    assert proc.stderr == ""
    with Image.open(image) as img:
        node = img.ns.lookup(ROOT_INO, name.encode())
        assert node.geometry.levels == EXPECTED_LEVELS[name]
        # the stored hash tree is fs-verity's Merkle tree, block for block
        stored = b"".join(img.hash_block(node, s) for s in range(node.hashes.count))
        assert stored == (tmp_path / "tree").read_bytes()
        assert merkle.descriptor(node.root_hash, node.size) == (tmp_path / "desc").read_bytes()


def test_digest_of_library_tree_matches_fsverity(tmp_path):
    for size in (0, 1, 4096, 4097, 129 * BLOCK_SIZE, 600 * 1024 + 3):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        root, _tree = merkle.tree_of_bytes(data)
        assert "sha256:" + merkle.digest(root, size).hex() == _fsverity(tmp_path / "f")


def test_digest_errors(parity, one_line_error):
    _src, image = parity
    one_line_error(run_incfs("digest", image, "/missing"), 2, "no such entry")
    one_line_error(run_incfs("digest", image, "/"), 2, "not a regular file")
    one_line_error(run_incfs("digest", image, "/size-1/below"), 2, "not a directory")


# --- signatures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed_images(small_tree, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed")
    images = {}
    for alg in ALGORITHMS:
        priv, _pub = keys(alg)
        images[alg] = out / f"{alg}.img"
        # the log layout: these tests edit INODES/DIRENTS/BLOCKS records
        # (test_index.py does the same to an index)
        pack(small_tree, images[alg], compress="lz4", sign_key=priv, index=False)
    return images


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_signature_accepts_the_right_key(signed_images, keys, alg):
    _priv, pub = keys(alg)
    report = verify_image(signed_images[alg], pub)
    assert report.ok and report.exit_code == 0, [str(p) for p in report.problems]
    assert report.signed and report.signature_verified
    assert report.signature_algorithm == alg
    with Image.open(signed_images[alg]) as img:
        img.verify_signature(signing.load_public(pub))
        assert report.signature_key_id == img.signature.entry.key_id.hex()
    proc = run_incfs("verify", signed_images[alg], "--key", pub)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_signature_rejects_other_keys(signed_images, keys, alg, one_line_error):
    _priv, other_same_alg = keys(alg, 1)
    report = verify_image(signed_images[alg], other_same_alg)
    assert report.exit_code == 1 and report.signature_verified is False
    assert any("different key" in p.message for p in report.problems)
    other_alg = next(a for a in ALGORITHMS if a != alg)
    proc = run_incfs("verify", signed_images[alg], "--key", keys(other_alg)[1])
    one_line_error(proc, 1, "integrity check failed")
    assert "signature" in proc.stdout


def test_unsigned_image(small_tree, tmp_path, keys):
    image = tmp_path / "unsigned.img"
    pack(small_tree, image)
    report = verify_image(image)
    assert report.exit_code == 0 and not report.signed
    assert verify_image(image, allow_unsigned=False).exit_code == 1
    proc = run_incfs("verify", image, "--key", keys("ed25519")[1])
    assert proc.returncode == 1 and "not signed" in proc.stdout


def test_signed_image_without_a_key_reports_the_signer(signed_images):
    proc = run_incfs("verify", signed_images["ecdsa-p256"])
    assert proc.returncode == 0, proc.stdout
    assert "signed (ecdsa-p256" in proc.stdout and "not checked" in proc.stdout


def _inode_offsets(body: bytes) -> dict[int, int]:
    """ino -> offset of its entry inside an INODES record body."""
    (count,) = struct.unpack_from("<I", body)
    pos, out = 4, {}
    for _ in range(count):
        ino = struct.unpack_from("<Q", body, pos)[0]
        meta_len, target_len = struct.unpack_from("<HH", body, pos + 80)
        out[ino] = pos
        pos += 84 + meta_len + target_len
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_namespace_change_is_caught_by_the_signature(signed_images, keys, tmp_path, alg):
    image = _copy(signed_images[alg], tmp_path / "img")
    with Image.open(image) as img:
        ino = img.ns.lookup(ROOT_INO, b"exec.sh").ino
    raw = RawImage(image)
    for offset, _h in raw.of_type(RecordType.INODES):
        body = bytearray(raw.body(offset))
        where = _inode_offsets(bytes(body)).get(ino)
        if where is not None:
            body[where + 24] ^= 0x01  # one bit of its mtime
            raw.set_body(offset, bytes(body))  # and a valid CRC: only the signature can tell
            break
    else:
        pytest.fail("inode not found")
    raw.save()
    with Image.open(image) as img:  # the record itself is fine
        assert img.scan.dropped_bytes == 0
        with pytest.raises(IntegrityError, match="differ from what was signed"):
            img.verify_signature(signing.load_public(keys(alg)[1]))
    report = verify_image(image, keys(alg)[1])
    assert report.exit_code == 1
    assert any(p.severity == INTEGRITY and "signature" in p.message for p in report.problems)
    # even without the key, the stored root no longer matches the namespace
    assert verify_image(image).exit_code == 1
    proc = run_incfs("verify", image, "--key", keys(alg)[1])
    assert proc.returncode == 1 and "differ from what was signed" in proc.stdout


def test_renamed_entry_is_caught_by_the_signature(signed_images, keys, tmp_path):
    image = _copy(signed_images["ed25519"], tmp_path / "img")
    raw = RawImage(image)
    offset, _h = raw.of_type(RecordType.DIRENTS)[0]
    body = raw.body(offset)
    assert b"exec.sh" in body
    raw.set_body(offset, body.replace(b"exec.sh", b"exec.sx"))
    raw.save()
    with Image.open(image) as img:
        assert img.ns.lookup(ROOT_INO, b"exec.sx")
    assert verify_image(image, keys("ed25519")[1]).exit_code == 1


def test_names_added_after_signing_are_reported(signed_images, keys, tmp_path):
    image = _copy(signed_images["ed25519"], tmp_path / "img")
    with Image.open(image, writable=True) as img:
        img.create_node(ROOT_INO, b"evil", stat.S_IFREG | 0o755, size=0)
    report = verify_image(image, keys("ed25519")[1])
    assert report.exit_code == 1
    assert any(p.path == "/evil" and "after the image was signed" in p.message
               for p in report.problems)
    # without a key it is only a note
    assert verify_image(image).exit_code == 0


# --- tampered blocks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_image(sample_tree_module, keys, tmp_path_factory):
    image = tmp_path_factory.mktemp("data") / "data.img"
    pack(sample_tree_module, image, compress="none", sign_key=keys("ed25519")[0], index=False)
    return image


@pytest.fixture(scope="module")
def sample_tree_module(tmp_path_factory):
    from conftest import build_sample_tree
    return build_sample_tree(tmp_path_factory.mktemp("tamper") / "tree", big=2 * MiB, deep=3)


def test_damaged_data_block_is_named(data_image, sample_tree_module, tmp_path, keys):
    image = _copy(data_image, tmp_path / "img")
    _ino, offset, size, _crc = block_location(image, b"/big.bin", TreeKind.DATA, 100)
    assert size == BLOCK_SIZE  # the first MiB of big.bin is random: stored raw
    raw = RawImage(image)
    raw.flip(offset + 1234, 0x40)
    raw.save()
    report = verify_image(image, keys("ed25519")[1])
    assert report.exit_code == 1
    bad = [p for p in report.problems if p.severity == INTEGRITY]
    assert len(bad) == 1
    assert (bad[0].path, bad[0].tree, bad[0].first, bad[0].last) == ("/big.bin", "data", 100, 100)
    assert "CRC32" in bad[0].message
    assert report.signature_verified  # the signature is fine: the block is not
    proc = run_incfs("verify", image, "--key", keys("ed25519")[1])
    assert proc.returncode == 1
    assert "/big.bin: data block 100:" in proc.stdout
    with Image.open(image) as img:  # and a read is refused, never served
        node = img.ns.lookup(ROOT_INO, b"big.bin")
        with pytest.raises(IntegrityError):
            img.read_block(node, 100)
        want = (sample_tree_module / "big.bin").read_bytes()
        assert img.read_block(node, 99) == want[99 * BLOCK_SIZE:100 * BLOCK_SIZE]


def test_data_block_with_forged_crc_fails_the_merkle_tree(data_image, sample_tree_module,
                                                          tmp_path):
    image = _copy(data_image, tmp_path / "img")
    ino, offset, size, _crc = block_location(image, b"/big.bin", TreeKind.DATA, 7)
    raw = RawImage(image)
    raw.forge_block(offset, size, ino, TreeKind.DATA, 7)
    raw.save()
    report = verify_image(image)
    bad = [p for p in report.problems if p.severity == INTEGRITY]
    assert [(p.path, p.tree, p.first) for p in bad] == [("/big.bin", "data", 7)]
    assert "Merkle tree" in bad[0].message
    with Image.open(image) as img:
        node = img.ns.lookup(ROOT_INO, b"big.bin")
        with pytest.raises(IntegrityError, match="fails verification"):
            img.read_block(node, 7)
        want = (sample_tree_module / "big.bin").read_bytes()
        assert img.read_block(node, 8) == want[8 * BLOCK_SIZE:9 * BLOCK_SIZE]


def test_damaged_hash_block_names_the_blocks_it_covers(data_image, tmp_path):
    image = _copy(data_image, tmp_path / "img")
    # big.bin: 512 data blocks -> 4 level-0 hash blocks under one top block
    ino, offset, size, _crc = block_location(image, b"/big.bin", TreeKind.HASH, 2)
    raw = RawImage(image)
    raw.flip(offset + 5, 0x80)
    raw.set_block_crc(ino, TreeKind.HASH, 2, zlib.crc32(bytes(raw.data[offset:offset + size])))
    raw.save()
    report = verify_image(image)
    bad = [(p.path, p.tree, p.first, p.last) for p in report.problems if p.severity == INTEGRITY]
    assert bad == [("/big.bin", "hash", 2, 2), ("/big.bin", "data", 128, 255)]
    assert "above it is damaged" in report.problems[-1].message
    proc = run_incfs("verify", image)
    assert proc.returncode == 1
    assert "/big.bin: hash block 2:" in proc.stdout
    assert "/big.bin: data blocks 128-255: cannot be verified" in proc.stdout
