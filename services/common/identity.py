"""A router's identity: a secp256k1 key (so it is also its chain address) and
its WireGuard key, generated on first start and kept (0600) under
<data_dir>/keys. Only the public parts ever leave this module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import coincurve
from Crypto.Hash import keccak
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

IDENTITY_FILE = "identity.key"
WIREGUARD_FILE = "wireguard.key"
SIGNATURE_LENGTH = 65  # r, s, recovery id
IDENTITY_KEY_LENGTH = 33  # compressed secp256k1 point


class IdentityError(ValueError):
    """A key file is unreadable or malformed; the message names it."""


def _sha256(message: bytes) -> bytes:
    return hashlib.sha256(message).digest()


def chain_address(identity_key: bytes) -> bytes:
    """The 20-byte EVM address of a (compressed) secp256k1 public key."""
    uncompressed = coincurve.PublicKey(identity_key).format(compressed=False)
    # pycryptodome's keccak rather than eth_utils': the same hash, 20 MB less per service
    return keccak.new(data=uncompressed[1:], digest_bits=256).digest()[-20:]


def verify(identity_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if signature is identity_key's over sha256(message)."""
    if len(signature) != SIGNATURE_LENGTH or len(identity_key) != IDENTITY_KEY_LENGTH:
        return False
    try:
        recovered = coincurve.PublicKey.from_signature_and_message(
            signature, message, hasher=_sha256
        )
    except Exception:  # coincurve raises plain Exception on a malformed signature
        return False
    return recovered.format(compressed=True) == identity_key


@dataclass(frozen=True)
class Identity:
    signing_key: coincurve.PrivateKey
    wireguard_private: bytes

    @property
    def identity_key(self) -> bytes:
        return self.signing_key.public_key.format(compressed=True)

    @property
    def chain_address(self) -> bytes:
        return chain_address(self.identity_key)

    @property
    def wireguard_public(self) -> bytes:
        private = X25519PrivateKey.from_private_bytes(self.wireguard_private)
        return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def wireguard_private_b64(self) -> str:
        return base64.b64encode(self.wireguard_private).decode()

    def sign(self, message: bytes) -> bytes:
        """65-byte recoverable signature over sha256(message)."""
        return self.signing_key.sign_recoverable(message, hasher=_sha256)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> Identity:
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        signing = _load_or_create(keys_dir / IDENTITY_FILE, lambda: os.urandom(32))
        wireguard = _load_or_create(keys_dir / WIREGUARD_FILE, _new_wireguard_key)
        try:
            return cls(coincurve.PrivateKey(signing), wireguard)
        except ValueError as err:
            raise IdentityError(f"{keys_dir / IDENTITY_FILE}: not a secp256k1 key: {err}") from None


def _new_wireguard_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _load_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    if not path.exists():
        _create_once(path, make())
    if path.stat().st_mode & 0o077:
        raise IdentityError(f"{path}: readable by others; chmod 600 it")
    try:
        secret = base64.b64decode(path.read_text().strip(), validate=True)
    except ValueError:
        raise IdentityError(f"{path}: not base64") from None
    if len(secret) != 32:
        raise IdentityError(f"{path}: holds {len(secret)} bytes, a key has 32")
    return secret


def _create_once(path: Path, secret: bytes) -> None:
    """Write a new key at path unless another process already has: a router's
    services start at once, each loads the keys, and all must end up with the
    same one (else hellos name an identity the handshakes do not prove). Written
    whole to a file of this process's own (a crash never leaves half a key),
    then linked into place, which fails if the key exists: the first one wins."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
