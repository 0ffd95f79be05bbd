"""Ed25519 signatures over a bundle's manifest, so a fleet runs only what its owner exported.

The manifest lists the sha256 of every artifact, so one signature over its exact bytes covers
the whole bundle.  The signature lives next to it in `manifest.sig` (JSON: algorithm, the
signing key's id, the signature in base64).  Keys are PEM files (PKCS#8 private, SPKI public)
as `hsiedge keygen` writes them; OpenSSH ed25519 keys (`ssh-keygen -t ed25519`) work too.
The cryptography is the maintained `cryptography` library's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hsiedge.atomic import atomic_path
from hsiedge.files import file_kind

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"
MAX_KEY_BYTES = 16 << 10
MAX_SIGNATURE_BYTES = 4 << 10


class SignatureError(ValueError):
    """A key or a signature cannot be used; one sentence says which file and why."""


def key_id(key: Ed25519PublicKey) -> str:
    """A short id of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_small(path: Path, what: str, limit: int) -> bytes:
    """The bytes of a small regular file (a FIFO or a huge file is refused before reading)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SignatureError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SignatureError(f"{path}: expected the {what} as a regular file, found {file_kind(st.st_mode)}")
    if st.st_size > limit:
        raise SignatureError(f"{path}: expected a {what} of at most {limit} bytes, found {st.st_size}")
    return path.read_bytes()


def generate_key(path: str | Path) -> tuple[Path, Path]:
    """Write a new private key to `path` (mode 0600) and its public key to `path`.pub."""
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    for p in (path, public):
        if p.exists():
            raise SignatureError(f"{p}: exists; refusing to replace a key")
    key = Ed25519PrivateKey.generate()
    with atomic_path(public) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return path, public


def _load_key(path: str | Path, what: str, loaders: tuple, kind: type, hint: str) -> Any:
    """The first of `loaders` that reads the file at `path` as a key of type `kind`."""
    path = Path(path)
    data = _read_small(path, f"{what} key", MAX_KEY_BYTES)
    for load in loaders:
        try:
            key = load(data)
        except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
            continue
        if isinstance(key, kind):
            return key
        raise SignatureError(f"{path}: expected an Ed25519 {what} key, found a {type(key).__name__}")
    raise SignatureError(f"{path}: expected an Ed25519 {what} key ({hint}), found something else")


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) or OpenSSH file without a passphrase."""
    return _load_key(path, "private", (lambda d: serialization.load_pem_private_key(d, password=None),
                                       lambda d: serialization.load_ssh_private_key(d, password=None)),
                     Ed25519PrivateKey, "PEM or OpenSSH, without a passphrase")


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SPKI) file or an OpenSSH `ssh-ed25519 ...` line."""
    return _load_key(path, "public", (serialization.load_pem_public_key, serialization.load_ssh_public_key),
                     Ed25519PublicKey, "PEM or an OpenSSH line; a private key goes to `hsiedge sign`, its "
                     ".pub to --trusted-key")


def sign_manifest(bundle: str | Path, manifest: bytes, private_key: str | Path) -> str:
    """Sign the manifest bytes `manifest` of the bundle directory `bundle` (the caller has
    verified them); write `manifest.sig`; return the key id."""
    key = load_private_key(private_key)
    kid = key_id(key.public_key())
    body = {"algorithm": ALGORITHM, "key_id": kid,
            "signature": base64.b64encode(key.sign(manifest)).decode()}
    with atomic_path(Path(bundle) / SIGNATURE) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
    return kid


def verify_manifest(bundle: str | Path, manifest: bytes, trusted: Sequence[str | Path]) -> str:
    """Check `manifest.sig` of `bundle` against the manifest bytes and the trusted public keys;
    return the id of the key that signed it."""
    sig_path = Path(bundle) / SIGNATURE
    keys = {key_id(k): k for k in map(load_public_key, trusted)}
    if not sig_path.exists() and not sig_path.is_symlink():
        raise SignatureError(f"{bundle}: the bundle is not signed (no {SIGNATURE}), and a trusted key was "
                             "given; sign it with `hsiedge sign BUNDLE KEY`")
    if sig_path.is_symlink():
        raise SignatureError(f"{sig_path}: expected a regular file inside the bundle, found a symbolic link")
    try:
        body = json.loads(_read_small(sig_path, "signature", MAX_SIGNATURE_BYTES))
        algorithm, kid, signature = body["algorithm"], body["key_id"], base64.b64decode(body["signature"],
                                                                                         validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SignatureError(f"{sig_path}: expected a JSON signature record (algorithm, key_id, "
                             "signature), found something else") from None
    if algorithm != ALGORITHM:
        raise SignatureError(f"{sig_path}: expected an {ALGORITHM} signature, found {str(algorithm)[:40]!r}")
    if kid not in keys:
        raise SignatureError(f"{bundle}: signed by key {str(kid)[:16]}, which is not a trusted key "
                             f"(trusted: {', '.join(keys)})")
    try:
        keys[kid].verify(signature, manifest)
    except InvalidSignature:
        raise SignatureError(f"{bundle}: the signature does not match the manifest (changed after it was "
                             f"signed by key {kid})") from None
    return kid
