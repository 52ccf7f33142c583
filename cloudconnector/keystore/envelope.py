"""Envelope encryption for the embedded key store: a master key wraps one data key per device.

AES-256-GCM everywhere, with a fresh 96-bit random nonce per encryption (stored in front of the
ciphertext). Every encryption carries associated data naming what it protects (the device slot and
the field), so a blob copied to another row or column fails authentication instead of decrypting.

The master key comes from ``CLOUDCONNECTOR_MASTER_KEY`` (base64 of 32 bytes) or from a key file
holding the same text; a missing key file is created with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudconnector.errors import InvalidSpec, PermanentError

MASTER_KEY_ENV = "CLOUDCONNECTOR_MASTER_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12


class TamperedError(PermanentError):
    """A ciphertext failed authentication: wrong master key, or data moved or altered."""

    reason = "KeyStoreTampered"


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """Decrypt ``blob``; ``what`` names it in the error (never the content)."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError) as e:
        raise TamperedError(f"{what} does not authenticate: wrong master key or altered data") from e


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSpec(where, "must hold the base64 of a 32-byte key") from None
    if len(key) != KEY_BYTES:
        raise InvalidSpec(where, "must hold the base64 of a 32-byte key")
    return key


def load_master_key(key_file: Path | None, env: Mapping[str, str] | None = None) -> bytes:
    """The master key from the environment, else from ``key_file`` (created 0600 when missing)."""
    env = os.environ if env is None else env
    if env.get(MASTER_KEY_ENV):
        return _decode(env[MASTER_KEY_ENV], MASTER_KEY_ENV)
    if key_file is None:
        raise InvalidSpec(MASTER_KEY_ENV, "is not set and no master key file is configured")
    if not key_file.exists():
        _create_key_file(key_file)
    if key_file.stat().st_mode & 0o077:
        raise InvalidSpec(str(key_file), "the master key file must not be readable by group or others")
    return _decode(key_file.read_text(), str(key_file))


def _create_key_file(key_file: Path) -> None:
    # Written in full to a private temporary name, then linked into place: another process
    # starting at the same moment sees either no file or the whole key, and link() never replaces.
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(new_key()).decode() + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, key_file)
    finally:
        tmp.unlink(missing_ok=True)
