"""How to reach and log in to Vault (or OpenBao): one frozen value, built from code or the environment.

Environment variables read by :meth:`VaultConfig.from_env`:

``VAULT_ADDR``
    Server URL, e.g. ``https://vault.vault.svc:8200`` (required).
``VAULT_CACERT``
    PEM bundle used to verify the server's certificate (default: the system trust store).
``VAULT_TOKEN`` / ``VAULT_TOKEN_FILE``
    The token for the ``token`` auth method; the file (e.g. a Vault Agent sink) is re-read on each
    login, so a rotated token is picked up after a 403.
``CLOUDCONNECTOR_VAULT_AUTH``
    ``token`` (default when ``VAULT_TOKEN``/``VAULT_TOKEN_FILE`` is set), ``kubernetes`` or ``jwt``.
``CLOUDCONNECTOR_VAULT_ROLE``
    Role name for the ``kubernetes`` and ``jwt`` methods (required for them).
``CLOUDCONNECTOR_VAULT_AUTH_MOUNT``
    Where the auth method is mounted (default ``kubernetes`` or ``jwt``).
``CLOUDCONNECTOR_VAULT_JWT_FILE``
    The JWT presented at login (default: the pod's service-account token file).
``CLOUDCONNECTOR_VAULT_KV_MOUNT``
    KV version 2 mount (default ``secret``).
``CLOUDCONNECTOR_VAULT_PREFIX``
    Path prefix inside the KV mount (default ``cloud-connector``).
``CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT``
    Transit mount holding the per-device keys (default ``transit``).
``CLOUDCONNECTOR_VAULT_TIMEOUT``
    Seconds per HTTP request (default 10).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cloudconnector.errors import InvalidSpec

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path


class AuthMethod(StrEnum):
    TOKEN = "token"  # noqa: S105 - a method name
    KUBERNETES = "kubernetes"
    JWT = "jwt"


@dataclass(frozen=True)
class VaultConfig:
    """Connection and layout settings; ``repr`` never shows the token."""

    address: str
    auth: AuthMethod = AuthMethod.TOKEN
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    role: str | None = None
    auth_mount: str | None = None  # None: the method's name
    jwt_file: Path = Path(SERVICE_ACCOUNT_TOKEN)
    ca_bundle: Path | None = None
    kv_mount: str = "secret"
    prefix: str = "cloud-connector"
    transit_mount: str = "transit"
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.address.startswith(("http://", "https://")):
            raise InvalidSpec("vault.address", "must be an http:// or https:// URL")
        if self.auth is AuthMethod.TOKEN and self.token is None and self.token_file is None:
            raise InvalidSpec("vault.token", "the token auth method needs a token or a token file")
        if self.auth is not AuthMethod.TOKEN and not self.role:
            raise InvalidSpec("vault.role", f"the {self.auth.value} auth method needs a role")
        for name in ("kv_mount", "transit_mount"):
            value = getattr(self, name)
            if not value or value.strip("/") != value:
                raise InvalidSpec(f"vault.{name}", "must be a mount path without leading or trailing '/'")
        if self.prefix.strip("/") != self.prefix:
            raise InvalidSpec("vault.prefix", "must not start or end with '/'")

    @property
    def login_mount(self) -> str:
        return self.auth_mount or self.auth.value

    @property
    def verify(self) -> str | bool:
        """What ``requests`` wants: a CA bundle path, or True for the system store."""
        return str(self.ca_bundle) if self.ca_bundle else True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VaultConfig:
        """Build from the variables listed in this module's docstring."""
        env = os.environ if env is None else env
        address = env.get("VAULT_ADDR")
        if not address:
            raise InvalidSpec("VAULT_ADDR", "is not set")
        token = env.get("VAULT_TOKEN") or None
        token_file = env.get("VAULT_TOKEN_FILE") or None
        method = env.get("CLOUDCONNECTOR_VAULT_AUTH", "token").strip().lower()
        try:
            auth = AuthMethod(method)
        except ValueError:
            raise InvalidSpec("CLOUDCONNECTOR_VAULT_AUTH", "must be token, kubernetes or jwt") from None
        timeout_text = env.get("CLOUDCONNECTOR_VAULT_TIMEOUT", "10")
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise InvalidSpec("CLOUDCONNECTOR_VAULT_TIMEOUT", "must be a number of seconds") from None
        return cls(
            address=address.rstrip("/"),
            auth=auth,
            token=token,
            token_file=Path(token_file) if token_file else None,
            role=env.get("CLOUDCONNECTOR_VAULT_ROLE") or None,
            auth_mount=env.get("CLOUDCONNECTOR_VAULT_AUTH_MOUNT") or None,
            jwt_file=Path(env.get("CLOUDCONNECTOR_VAULT_JWT_FILE") or SERVICE_ACCOUNT_TOKEN),
            ca_bundle=Path(env["VAULT_CACERT"]) if env.get("VAULT_CACERT") else None,
            kv_mount=env.get("CLOUDCONNECTOR_VAULT_KV_MOUNT", "secret"),
            prefix=env.get("CLOUDCONNECTOR_VAULT_PREFIX", "cloud-connector"),
            transit_mount=env.get("CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT", "transit"),
            timeout=timeout,
        )
