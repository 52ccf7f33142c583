"""Which key store the standalone mode uses: Vault when the environment names one, else embedded.

The embedded store (an encrypted SQLite file next to the state database) takes its master key from
``CLOUDCONNECTOR_MASTER_KEY`` when set, else from ``master.key`` in the state directory, created
once with owner-only permissions; without that key the stored credentials cannot be decrypted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudconnector.keystore.base import KeyReader, KeyWriter


@dataclass(frozen=True)
class KeyStores:
    writer: KeyWriter  # for the reconcilers: put, describe, delete
    reader: KeyReader  # for the in-process proxy only
    kind: str  # "vault" or "embedded", for the startup log line
    closer: Any = None


def open_key_stores(state_dir: Path, env: Mapping[str, str] | None = None) -> KeyStores:
    env = os.environ if env is None else env
    if env.get("VAULT_ADDR"):
        from cloudconnector.keystore.vault import VaultKeyStore

        vault = VaultKeyStore.from_env(env)
        return KeyStores(vault, vault, "vault", vault)
    from cloudconnector.keystore.embedded import EmbeddedKeyStore

    state_dir.mkdir(parents=True, exist_ok=True)
    store = EmbeddedKeyStore.open(state_dir / "keys.db", state_dir / "master.key", env)
    return KeyStores(store, store.reader(), "embedded")
