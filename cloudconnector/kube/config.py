"""Where the Kubernetes API is and how to authenticate, from one of three sources.

Order: an explicit server URL (``CLOUDCONNECTOR_K8S_SERVER``, used by tests against kmock), the
in-cluster service account, then a kubeconfig file (``KUBECONFIG`` or ``~/.kube/config``). The same
value configures both kopf (through ``kopf.on.login``) and the small client in this package, so the
two never disagree about the cluster.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudconnector.errors import InvalidSpec

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubeConfig:
    """Connection settings; ``repr`` never shows the token or key material."""

    server: str
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None  # re-read per request: projected tokens rotate
    ca_path: Path | None = None
    ca_data: str | None = field(default=None, repr=False)
    cert_data: str | None = field(default=None, repr=False)
    key_data: str | None = field(default=None, repr=False)
    insecure: bool = False
    default_namespace: str | None = None

    def bearer(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeConfig:
        env = os.environ if env is None else env
        server = env.get("CLOUDCONNECTOR_K8S_SERVER")
        if server:
            return cls(server=server.rstrip("/"), token=env.get("CLOUDCONNECTOR_K8S_TOKEN") or None)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if host and port and (SA_DIR / "token").exists():
            namespace_file = SA_DIR / "namespace"
            return cls(
                server=f"https://{_bracket(host)}:{port}",
                token_file=SA_DIR / "token",
                ca_path=SA_DIR / "ca.crt",
                default_namespace=namespace_file.read_text().strip() if namespace_file.exists() else None,
            )
        path = Path(env.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config")
        if path.exists():
            return cls.from_kubeconfig(path)
        raise InvalidSpec("kubernetes", "no CLOUDCONNECTOR_K8S_SERVER, no service account and no kubeconfig")

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubeConfig:
        doc: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        name = context or doc.get("current-context")
        ctx = _named(doc.get("contexts"), name, "context")
        cluster = _named(doc.get("clusters"), ctx.get("cluster"), "cluster")
        user = _named(doc.get("users"), ctx.get("user"), "user") if ctx.get("user") else {}
        ca_path = cluster.get("certificate-authority")
        token_file = user.get("tokenFile")
        return cls(
            server=str(cluster["server"]).rstrip("/"),
            token=user.get("token"),
            token_file=Path(token_file) if token_file else None,
            ca_path=Path(ca_path) if ca_path else None,
            ca_data=_decode(cluster.get("certificate-authority-data")),
            cert_data=_decode(user.get("client-certificate-data")) or _read(user.get("client-certificate")),
            key_data=_decode(user.get("client-key-data")) or _read(user.get("client-key")),
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            default_namespace=ctx.get("namespace"),
        )


def _named(items: Any, name: Any, what: str) -> dict[str, Any]:
    for item in items or ():
        if item.get("name") == name:
            return dict(item.get(what) or {})
    raise InvalidSpec(f"kubeconfig.{what}s", f"no {what} named {name!r}")


def _decode(data: str | None) -> str | None:
    return base64.b64decode(data).decode() if data else None


def _read(path: str | None) -> str | None:
    return Path(path).read_text() if path else None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
