"""Where the Kubernetes API is and how to log in to it, as kubectl would.

Order: an explicit server URL (``CLOUDCONNECTOR_K8S_SERVER`` with ``CLOUDCONNECTOR_K8S_TOKEN``, used
by tests against kmock), the in-cluster service account (mounted at the usual path, or where
``CLOUDCONNECTOR_K8S_SA_DIR`` says), then a kubeconfig (``KUBECONFIG``, which
may list several files, or ``~/.kube/config``; ``CLOUDCONNECTOR_K8S_CONTEXT`` picks a context other
than the current one). The in-cluster account and kubeconfigs are read by kubernetes_asyncio's
config loader, so whatever a user's kubeconfig holds works here: ``exec`` plugins (``aws eks
get-token``, ``gke-gcloud-auth-plugin``, ``kubelogin``), token files, client certificates, OIDC.

Credentials are looked up again every :data:`REFRESH_SECONDS` (projected service-account tokens
and token files rotate; an exec plugin's token expires) and at once after the API server answers
401. The same settings serve kopf (``kopf.on.login``, see :func:`kopf_connection_info`) and the
small client in this package, so the two never disagree about the cluster. Nothing here logs or
repeats a token or key.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cloudconnector.errors import InvalidSpec, short

if TYPE_CHECKING:
    import kopf
    from kubernetes_asyncio.client.configuration import Configuration

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SA_DIR_ENV = "CLOUDCONNECTOR_K8S_SA_DIR"  # the account's token, ca.crt and namespace mounted elsewhere
REFRESH_SECONDS = 60.0
CONTEXT_ENV = "CLOUDCONNECTOR_K8S_CONTEXT"


class KubeLoginError(InvalidSpec):
    """The credentials could not be obtained: a malformed kubeconfig, or an exec plugin that failed."""

    reason = "KubeLoginFailed"


@dataclass(frozen=True)
class Connection:
    """What one request needs: the server, the Authorization header value and the TLS settings."""

    server: str
    authorization: str | None = field(repr=False)
    ssl: ssl.SSLContext | bool
    tls_server_name: str | None = None
    # Files, for kopf: a CA bundle, a client certificate and key (the loader's 0600 temp files).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    expires: datetime | None = None  # an exec plugin's expirationTimestamp, for kopf


class KubeConfig:
    """Connection settings for one cluster; ``repr`` never shows credentials.

    ``KubeConfig(server, token)`` is a fixed server and bearer token; :meth:`from_env` finds the
    cluster as described in the module docstring and logs in on first use.
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        default_namespace: str | None = None,
        _login: _Login | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.default_namespace = default_namespace
        self._token = token
        self._login = _login
        self._current: Connection | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<KubeConfig {self.server} via {self._login.source if self._login else 'fixed token'}>"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubeConfig:
        env = os.environ if env is None else env
        server = env.get("CLOUDCONNECTOR_K8S_SERVER")
        if server:
            return cls(server, env.get("CLOUDCONNECTOR_K8S_TOKEN") or None)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        sa_dir = Path(env.get(SA_DIR_ENV) or SA_DIR)
        if host and port and (sa_dir / "token").exists():
            namespace_file = sa_dir / "namespace"
            namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
            login = _InCluster(dict(env), sa_dir)
            return cls(f"https://{_bracket(host)}:{port}", default_namespace=namespace, _login=login)
        paths = env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        if not any(Path(p).expanduser().exists() for p in paths.split(os.pathsep) if p):
            raise InvalidSpec(
                "kubernetes", "no CLOUDCONNECTOR_K8S_SERVER, no service account and no kubeconfig"
            )
        return cls.from_kubeconfig(paths, env.get(CONTEXT_ENV) or None)

    @classmethod
    def from_kubeconfig(cls, paths: str | Path, context: str | None = None) -> KubeConfig:
        """A kubeconfig (or several, joined by ``os.pathsep``), at ``context`` or its current one."""
        login = _Kubeconfig(str(paths), context)
        return cls(login.server, default_namespace=login.namespace, _login=login)

    async def connection(self, *, fresh: bool = False) -> Connection:
        """The current settings; credentials are fetched again when due or when ``fresh``."""
        if self._login is None:
            if self._current is None:
                auth = f"Bearer {self._token}" if self._token else None
                self._current = Connection(self.server, auth, _ssl_for(self.server, None, None, None, True))
            return self._current
        async with self._lock:
            due = time.monotonic() - self._fetched > REFRESH_SECONDS
            if self._current is None or fresh or due:
                try:
                    self._current = await self._login.connection(self.server, fresh=fresh)
                except KubeLoginError:
                    if self._current is None:
                        raise
                    # The old credentials may still be good; the server says so with a 401.
                self._fetched = time.monotonic()
            return self._current


class _Login:
    source: str

    async def connection(self, server: str, *, fresh: bool) -> Connection:
        raise NotImplementedError


class _Kubeconfig(_Login):
    """A kubeconfig read by kubernetes_asyncio's loader; the exec plugin runs on (re)login."""

    def __init__(self, paths: str, context: str | None) -> None:
        from kubernetes_asyncio.config import ConfigException
        from kubernetes_asyncio.config.kube_config import KubeConfigLoader, KubeConfigMerger

        self.source = f"kubeconfig {paths}" + (f" context {context}" if context else "")
        try:
            merged = KubeConfigMerger(paths).config
            if merged is None:
                raise ConfigException("no kubeconfig file found")
            self._loader = KubeConfigLoader(config_dict=merged, active_context=context, config_base_path=None)
            ctx = self._loader.current_context or {}
            cluster = merged["clusters"].get_with_name(ctx["context"]["cluster"])
            self.server = str(cluster["cluster"]["server"])
            self.namespace: str | None = ctx["context"].get("namespace")
        except (ConfigException, AssertionError, KeyError, TypeError, OSError, ValueError) as e:
            raise KubeLoginError(self.source, _why(e, "has no such context or cluster")) from None

    async def connection(self, server: str, *, fresh: bool) -> Connection:
        from kubernetes_asyncio.client.configuration import Configuration

        if fresh:
            # The server refused the last credentials: run the exec plugin again even though its
            # answer claimed to be valid for longer (the loader keeps it until that time).
            vars(self._loader).pop("exec_plugin_expiry", None)
        conf = Configuration()
        try:
            await self._loader.load_and_set(conf)
        except Exception as e:  # the plugin's failure, in its own words (never its output)
            raise KubeLoginError(self.source, _why(e, "login failed")) from None
        expires = getattr(self._loader, "exec_plugin_expiry", None)
        return replace(_from_configuration(conf), expires=expires if isinstance(expires, datetime) else None)


class _InCluster(_Login):
    """The pod's service account: the token file is read again as the kubelet rotates it."""

    source = "in-cluster service account"

    def __init__(self, env: dict[str, str], sa_dir: Path) -> None:
        self._env = env
        self._dir = sa_dir

    async def connection(self, server: str, *, fresh: bool) -> Connection:
        from kubernetes_asyncio.client.configuration import Configuration
        from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

        conf = Configuration()
        try:
            InClusterConfigLoader(
                token_filename=str(self._dir / "token"),
                cert_filename=str(self._dir / "ca.crt"),
                environ=self._env,
            ).load_and_set(conf)
        except Exception as e:
            raise KubeLoginError(self.source, _why(e, "cannot read the service account")) from None
        return _from_configuration(conf)


def _from_configuration(conf: Configuration) -> Connection:
    auth = str(conf.api_key.get("BearerToken") or "").strip() or None
    verify = bool(conf.verify_ssl)
    server = str(conf.host).rstrip("/")
    return Connection(
        server=server,
        authorization=auth,
        ssl=_ssl_for(server, conf.ssl_ca_cert, conf.cert_file, conf.key_file, verify),
        tls_server_name=conf.tls_server_name or None,
        ca_file=conf.ssl_ca_cert or None,
        cert_file=conf.cert_file or None,
        key_file=conf.key_file or None,
        insecure=not verify,
    )


def _ssl_for(
    server: str, ca_file: str | None, cert_file: str | None, key_file: str | None, verify: bool
) -> ssl.SSLContext | bool:
    if not server.startswith("https://"):
        return False
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _why(e: BaseException, fallback: str) -> str:
    text = str(e).strip()
    return short(text, 300) if text else fallback


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def kopf_connection_info(config: KubeConfig) -> kopf.ConnectionInfo:
    """kopf's login answer from the same settings (logging in afresh: kopf asks after a 401)."""
    import kopf

    conn = await config.connection(fresh=True)
    scheme, _, token = (conn.authorization or "").partition(" ")
    return kopf.ConnectionInfo(
        server=conn.server,
        scheme=scheme or None,
        token=token or None,
        ca_path=conn.ca_file,
        certificate_path=conn.cert_file,
        private_key_path=conn.key_file,
        insecure=conn.insecure or None,
        default_namespace=config.default_namespace,
        expiration=conn.expires,  # kopf logs in again before an exec credential runs out
    )


__all__ = ["Connection", "KubeConfig", "KubeLoginError", "kopf_connection_info"]
