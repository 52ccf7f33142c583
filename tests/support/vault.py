"""Roles on a test OpenBao: the project's policies bootstrapped, and tokens bound to one policy each.

Tokens get no default policy, so what a test proves about the operator's or the proxy's rights is
exactly what ``deploy/vault/*.hcl`` grant.
"""

from __future__ import annotations

import hvac

from cloudconnector.keystore.vault_setup import bootstrap
from tests.support.procs import Bao


def bootstrapped(bao: Bao) -> hvac.Client:
    """A root client on ``bao`` after enabling KV v2 + transit and writing both policies."""
    root = hvac.Client(url=bao.url, token=bao.token)
    bootstrap(root)
    return root


def mint_token(root: hvac.Client, policy: str, ttl: str = "1h") -> str:
    created = root.auth.token.create(policies=[policy], no_default_policy=True, ttl=ttl)
    return str(created["auth"]["client_token"])
