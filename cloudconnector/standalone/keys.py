"""Which key store the standalone mode uses: Vault when the environment names one, else embedded.

The embedded store (an encrypted SQLite file next to the state database) takes its master key from
``CLOUDCONNECTOR_MASTER_KEY`` when set, else from ``master.key`` in the state directory, created
once with owner-only permissions; without that key the stored credentials cannot be decrypted.

With ``VAULT_ADDR`` set, keys go to Vault (settings: :mod:`cloudconnector.keystore.vault_config`).
``VAULT_TOKEN`` is then the provisioning side's token; ``CLOUDCONNECTOR_PROXY_VAULT_TOKEN``, when
set, is the in-process proxy's read-only token, so each role keeps only the rights it needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudconnector.keystore.base import KeyReader, KeyWriter

PROXY_TOKEN_ENV = "CLOUDCONNECTOR_PROXY_VAULT_TOKEN"  # noqa: S105 - a variable name


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

        writer = VaultKeyStore.from_env(env)
        reader = writer
        if env.get(PROXY_TOKEN_ENV):
            # Keep Vault's split of roles in one process: the proxy reads with its own token.
            reader = VaultKeyStore.from_env(
                {**env, "VAULT_TOKEN": env[PROXY_TOKEN_ENV], "VAULT_TOKEN_FILE": ""}
            )
        return KeyStores(writer, reader, "vault", (writer, reader))
    from cloudconnector.keystore.embedded import EmbeddedKeyStore

    state_dir.mkdir(parents=True, exist_ok=True)
    store = EmbeddedKeyStore.open(state_dir / "keys.db", state_dir / "master.key", env)
    return KeyStores(store, store.reader(), "embedded", store)
