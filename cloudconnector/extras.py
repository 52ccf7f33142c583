"""Which optional extra (pyproject.toml) provides a module, and the one line naming the install.

The base install carries only what every component shares; the operator, the proxy, each cloud
and Vault come as extras, so the proxy image holds no cloud SDK and the operator image no TLS
internals. A command that reaches for an extra that is not installed ends with one line saying
which extra and how to install it, never with a traceback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from cloudconnector.errors import PermanentError

PACKAGE = "cloud-connector"

# Top-level import name -> the extra that installs it.
PROVIDED_BY: dict[str, str] = {
    "boto3": "aws",
    "botocore": "aws",
    "azure": "azure",
    "hvac": "vault",
    "requests": "vault",
    "kubernetes_asyncio": "kube",
    "OpenSSL": "proxy",
    "prometheus_client": "proxy",
    "kopf": "operator",
    "moto": "demo",
    "paho": "demo",
}


class MissingExtra(PermanentError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    reason = "MissingDependency"

    def __init__(self, what: str, extra: str, module: str) -> None:
        super().__init__(f"{what} needs the {extra} extra ({module} is not installed): {install_hint(extra)}")
        self.extra = extra
        self.module = module


def install_hint(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def extra_for(error: ModuleNotFoundError) -> str | None:
    """The extra that provides the module an import failed on; None for anything else (a bug)."""
    top = (error.name or "").split(".", 1)[0]
    return PROVIDED_BY.get(top)


def require(what: str, extra: str, modules: Iterable[str]) -> None:
    """Raise :class:`MissingExtra` unless every module in ``modules`` can be imported."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package of a dotted name is missing
            found = False
        if not found:
            raise MissingExtra(what, extra, module)
