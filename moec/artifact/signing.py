"""Ed25519 signing of bundle manifests (through ``cryptography``): key pairs, sign, verify.

The signature covers the exact bytes of ``manifest.json``, and the manifest holds the sha256
and size of every other file, so a valid signature vouches for the whole bundle directory.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from moec.core.errors import MoecError

SIGNATURE_FILE = "manifest.sig"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MoecError("signing needs the 'cryptography' package (pip install cryptography)") from None
    return ed25519, serialization, InvalidSignature


def generate_keypair(private_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) to ``private_path`` and its public key to ``<path>.pub``."""
    ed25519, ser, _ = _crypto()
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists():
            raise MoecError(f"'{p}' already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub_pem = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        priv.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub.write_bytes(pub_pem)
    except OSError as exc:
        raise MoecError(f"cannot write key '{priv}': {exc.strerror or exc}") from None
    return priv, pub


def _read_key_file(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"{what} '{p}' does not exist")
    data = p.read_bytes()
    if len(data) > 16384:
        raise MoecError(f"{what} '{p}' is not an Ed25519 key (too large)")
    return data


def load_private_key(path: str | os.PathLike):
    ed25519, ser, _ = _crypto()
    data = _read_key_file(path, "signing key")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise MoecError(f"signing key '{path}' is not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MoecError(f"signing key '{path}' is not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike):
    ed25519, ser, _ = _crypto()
    data = _read_key_file(path, "public key")
    try:
        key = ser.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise MoecError(f"public key '{path}' is not a PEM public key (use the .pub file moec keygen wrote)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MoecError(f"public key '{path}' is not an Ed25519 key")
    return key


def sign(manifest_bytes: bytes, private_key_path: str | os.PathLike) -> bytes:
    """The signature file's content (base64 Ed25519 signature + newline) for ``manifest_bytes``."""
    sig = load_private_key(private_key_path).sign(manifest_bytes)
    return base64.b64encode(sig) + b"\n"


def verify(manifest_bytes: bytes, signature_file: bytes, public_key_path: str | os.PathLike, where: str) -> None:
    """Raise MoecError unless ``signature_file`` is a valid signature of ``manifest_bytes``."""
    _, _, invalid = _crypto()
    key = load_public_key(public_key_path)
    try:
        sig = base64.b64decode(signature_file.strip(), validate=True)
    except ValueError:
        raise MoecError(f"{where}: {SIGNATURE_FILE} is malformed; refusing to load") from None
    try:
        key.verify(sig, manifest_bytes)
    except invalid:
        raise MoecError(f"{where}: signature does not match the trusted key '{public_key_path}'; "
                        "refusing to load") from None
