"""Signatures over the image root: Ed25519, ECDSA P-256 (SHA-256) and RSA-PSS.

Keys are PEM files: the private key (mode 0600) and KEY.pub beside it. A key
is named inside an image by its id, the SHA-256 of its DER public key, so a
wrong key is reported as such instead of as a bad signature.
"""

from __future__ import annotations

import enum
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..errors import IntegrityError, UsageError

SIGNED_CONTEXT = b"incfs image root v1\0"


class Algorithm(enum.IntEnum):
    ED25519 = 1
    ECDSA_P256 = 2
    RSA_PSS = 3


ALGORITHM_NAMES = {"ed25519": Algorithm.ED25519, "ecdsa-p256": Algorithm.ECDSA_P256,
                   "rsa": Algorithm.RSA_PSS}

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def generate(algorithm: Algorithm):
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm is Algorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def write_keypair(path: Path, algorithm: Algorithm) -> tuple[Path, Path]:
    """Create KEY (private, 0600) and KEY.pub; refuses to overwrite either."""
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists():
            raise UsageError(f"{p} already exists; not overwriting a key")
    key = generate(algorithm)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return path, pub_path


def load_private(path: str | os.PathLike):
    try:
        data = Path(path).read_bytes()
        return serialization.load_pem_private_key(data, password=None)
    except OSError as e:
        raise UsageError(f"cannot read key {path}: {e.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UsageError(f"{path} is not an unencrypted PEM private key") from None


def load_public(path: str | os.PathLike):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read key {path}: {e.strerror}") from None
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        pass
    try:  # accept the private key too: its public half is what we need
        return serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UsageError(f"{path} is not a PEM public key") from None


def algorithm_of(key) -> Algorithm:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return Algorithm.ED25519
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name != "secp256r1":
            raise UsageError(f"unsupported curve {key.curve.name}; use P-256")
        return Algorithm.ECDSA_P256
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return Algorithm.RSA_PSS
    raise UsageError(f"unsupported key type {type(key).__name__}")


def key_id(public_key) -> bytes:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def sign(private_key, root: bytes) -> tuple[Algorithm, bytes, bytes]:
    """Sign a 32-byte root; returns (algorithm, key id, signature)."""
    alg = algorithm_of(private_key)
    message = SIGNED_CONTEXT + root
    if alg is Algorithm.ED25519:
        sig = private_key.sign(message)
    elif alg is Algorithm.ECDSA_P256:
        sig = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    else:
        sig = private_key.sign(message, _PSS, hashes.SHA256())
    return alg, key_id(private_key.public_key()), sig


def verify(public_key, algorithm: int, signer_id: bytes, root: bytes,
           signature: bytes) -> None:
    """Raise IntegrityError unless `signature` is `public_key`'s over `root`."""
    if key_id(public_key) != signer_id:
        raise IntegrityError("image is signed by a different key")
    if algorithm_of(public_key) != algorithm:
        raise IntegrityError("signature algorithm does not match the key")
    message = SIGNED_CONTEXT + root
    try:
        if algorithm == Algorithm.ED25519:
            public_key.verify(signature, message)
        elif algorithm == Algorithm.ECDSA_P256:
            public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(signature, message, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise IntegrityError("image signature does not verify") from None
