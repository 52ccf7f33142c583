"""Which key store the standalone mode uses: Vault when the environment names one, else embedded.

The embedded store lives next to the state database. Its master key comes from
``CLOUDCONNECTOR_MASTER_KEY`` when set (so it can live in a secret manager) or from a file made
once with owner-only permissions; without it the stored keys cannot be decrypted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudconnector.keystore.base import KeyReader, KeyWriter

MASTER_KEY_ENV = "CLOUDCONNECTOR_MASTER_KEY"


@dataclass(frozen=True)
class KeyStores:
    writer: KeyWriter
    reader: KeyReader
    kind: str  # "vault" or "embedded", for the startup log line
    closer: Any = None


def master_key(state_dir: Path, env: Mapping[str, str]) -> bytes:
    """The embedded store's master key: from the environment, else a file created once (0600)."""
    text = env.get(MASTER_KEY_ENV)
    if text:
        return text.encode()
    path = state_dir / "master.key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode())
    return path.read_bytes().strip()


def open_key_stores(state_dir: Path, env: Mapping[str, str] | None = None) -> KeyStores:
    env = os.environ if env is None else env
    if env.get("VAULT_ADDR"):
        from cloudconnector.keystore.vault import VaultKeyStore

        vault = VaultKeyStore.from_env(env)
        return KeyStores(vault, vault, "vault", vault)
    from cloudconnector.keystore.embedded import EmbeddedKeyStore

    store = EmbeddedKeyStore(state_dir / "keys.db", master_key(state_dir, env))
    return KeyStores(store, store.reader(), "embedded", store)
