"""Prepare a Vault (or OpenBao) server for Cloud Connector: engines, the two policies, auth roles.

The policies are the security boundary of the key store, so they are generated here from the same
settings the store uses, and ``deploy/vault/*.hcl`` are their renderings for the default layout
(a test keeps both in sync):

- the operator may create, update and delete device secrets, read and write their metadata, and
  create, configure, encrypt with and delete ``cc-*`` transit keys; it has no read on secret data
  and no decrypt, so it can never get a private key back;
- the proxy may read secret data and decrypt with ``cc-*`` transit keys, nothing else.

:func:`bootstrap` needs a token allowed to manage mounts, policies and auth methods (an admin or
root token), and is safe to run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import hvac

from cloudconnector.keystore.vault import TRANSIT_PREFIX

OPERATOR_POLICY = "cloud-connector-operator"
PROXY_POLICY = "cloud-connector-proxy"


@dataclass(frozen=True)
class Layout:
    kv_mount: str = "secret"
    prefix: str = "cloud-connector"
    transit_mount: str = "transit"

    @property
    def kv_data(self) -> str:
        return f"{self.kv_mount}/data/{self.prefix}/*" if self.prefix else f"{self.kv_mount}/data/*"

    @property
    def kv_metadata(self) -> str:
        return f"{self.kv_mount}/metadata/{self.prefix}/*" if self.prefix else f"{self.kv_mount}/metadata/*"

    def transit(self, action: str) -> str:
        return f"{self.transit_mount}/{action}/{TRANSIT_PREFIX}*"


@dataclass(frozen=True)
class AuthRole:
    """A login role for the operator or the proxy at a ``kubernetes`` or ``jwt`` auth mount."""

    name: str
    policies: tuple[str, ...]
    service_accounts: tuple[str, ...] = ()  # kubernetes: bound service account names
    namespaces: tuple[str, ...] = ()  # kubernetes: bound namespaces
    subject: str | None = None  # jwt: bound ``sub`` claim
    audiences: tuple[str, ...] = ()  # both: accepted ``aud`` values
    ttl: str = "1h"


@dataclass(frozen=True)
class AuthSetup:
    """How to enable one auth method; ``config`` is passed as is to ``auth/{mount}/config``."""

    method: str  # "kubernetes" or "jwt"
    config: dict[str, object] = field(default_factory=dict)
    roles: Sequence[AuthRole] = ()
    mount: str | None = None


def _block(path: str, capabilities: Sequence[str], why: str) -> str:
    caps = ", ".join(f'"{c}"' for c in capabilities)
    return f'# {why}\npath "{path}" {{\n  capabilities = [{caps}]\n}}\n'


def operator_policy(layout: Layout | None = None) -> str:
    """Write-only on key material: no read on secret data, no transit decrypt."""
    lay = layout or Layout()
    return "\n".join(
        [
            "# Cloud Connector operator: stores device credentials but can never read them back.\n",
            _block(lay.kv_data, ["create", "update"], "Write device secrets (new versions); no read."),
            _block(
                lay.kv_metadata,
                ["create", "update", "read", "delete"],
                "Non-secret facts for resume checks; delete removes every version.",
            ),
            _block(
                lay.transit("keys"),
                ["create", "update", "delete"],
                "Each device's own key: create, config, delete.",
            ),
            _block(
                lay.transit("encrypt"), ["update"], "Encrypt with a device key; there is no decrypt grant."
            ),
        ]
    )


def proxy_policy(layout: Layout | None = None) -> str:
    """Read-only on key material: read secret data and decrypt, nothing else."""
    lay = layout or Layout()
    return "\n".join(
        [
            "# Cloud Connector proxy: reads device credentials at connect time, changes nothing.\n",
            _block(lay.kv_data, ["read"], "Read device secrets."),
            _block(lay.transit("decrypt"), ["update"], "Decrypt with a device key."),
        ]
    )


def bootstrap(
    client: hvac.Client,
    layout: Layout | None = None,
    *,
    auth: Sequence[AuthSetup] = (),
    operator_policy_name: str = OPERATOR_POLICY,
    proxy_policy_name: str = PROXY_POLICY,
) -> None:
    """Enable KV v2 and transit when missing, write both policies, configure auth roles."""
    lay = layout or Layout()
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    kv = mounts.get(f"{lay.kv_mount}/")
    if kv is None:
        client.sys.enable_secrets_engine("kv", path=lay.kv_mount, options={"version": "2"})
    elif kv.get("type") != "kv" or str((kv.get("options") or {}).get("version")) != "2":
        raise RuntimeError(f"the mount {lay.kv_mount}/ exists but is not KV version 2")
    transit = mounts.get(f"{lay.transit_mount}/")
    if transit is None:
        client.sys.enable_secrets_engine("transit", path=lay.transit_mount)
    elif transit.get("type") != "transit":
        raise RuntimeError(f"the mount {lay.transit_mount}/ exists but is not transit")
    client.sys.create_or_update_policy(operator_policy_name, operator_policy(lay))
    client.sys.create_or_update_policy(proxy_policy_name, proxy_policy(lay))
    for setup in auth:
        _setup_auth(client, setup)


def _setup_auth(client: hvac.Client, setup: AuthSetup) -> None:
    if setup.method not in ("kubernetes", "jwt"):
        raise ValueError(f"unsupported auth method {setup.method!r}")
    mount = setup.mount or setup.method
    enabled = client.sys.list_auth_methods()
    enabled = enabled.get("data", enabled)
    if f"{mount}/" not in enabled:
        client.sys.enable_auth_method(setup.method, path=mount)
    client.write_data(f"auth/{mount}/config", data=dict(setup.config))
    for role in setup.roles:
        body: dict[str, object] = {"token_policies": list(role.policies), "token_ttl": role.ttl}
        if setup.method == "kubernetes":
            body["bound_service_account_names"] = list(role.service_accounts)
            body["bound_service_account_namespaces"] = list(role.namespaces)
            if role.audiences:
                body["audience"] = role.audiences[0]
        else:
            body["role_type"] = "jwt"
            body["user_claim"] = "sub"
            body["bound_audiences"] = list(role.audiences)
            if role.subject:
                body["bound_subject"] = role.subject
        client.write_data(f"auth/{mount}/role/{role.name}", data=body)
