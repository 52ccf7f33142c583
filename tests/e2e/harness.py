"""The product as a platform team installs it, on a real API server: the Helm chart rendered by Helm
and applied for real, then the operator and the proxy run as local processes (there is no kubelet)
that log in with the chart's own ServiceAccount tokens, so the chart's RBAC is what is tested. Vault
is a real OpenBao whose Kubernetes auth method reviews those same tokens against the API server.

Use :func:`install` once per test module or test; it gives an :class:`Install` that starts processes
with the environment the chart's Deployments would give the containers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY, AuthRole, AuthSetup, bootstrap
from tests.helm.chart import CHART_DIR, Rendered, load, render
from tests.support.kube import ApiError, Kube, install_crds
from tests.support.procs import Bao, Process, free_port

# Kinds a chart may render whose APIs belong to add-ons this bare API server does not serve.
ADDON_KINDS = {"ServiceMonitor", "Certificate"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}


def apply_rendered(kube: Kube, rendered: Rendered, namespace: str) -> list[dict[str, Any]]:
    """Create every rendered object for real, after the chart's crds/ as Helm installs them;
    returns the add-on objects left out (their APIs are not served here). Namespaces the objects
    name are created first."""
    install_crds(kube, CHART_DIR / "crds")
    served = {r["kind"] for g in _api_resources(kube) for r in g}
    wanted_ns = {namespace} | {
        o["metadata"]["namespace"] for o in rendered.objects if o["metadata"].get("namespace")
    }
    for ns in sorted(wanted_ns):
        with contextlib.suppress(ApiError):
            kube.request(
                "POST",
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
    skipped = []
    objs = []
    for obj in rendered.objects:
        if obj["kind"] not in served:
            assert obj["kind"] in ADDON_KINDS, f"the chart renders {obj['kind']}, which no API serves"
            skipped.append(obj)
            continue
        if obj["kind"] not in CLUSTER_SCOPED:
            obj = {**obj, "metadata": {"namespace": namespace, **obj["metadata"]}}
        objs.append(obj)
    if objs:
        kube.apply(*objs, server_side=True)
    return skipped


def _api_resources(kube: Kube) -> Iterator[list[dict[str, Any]]]:
    yield kube.request("GET", "/api/v1")["resources"]
    for group in kube.request("GET", "/apis")["groups"]:
        version = group["preferredVersion"]["groupVersion"]
        yield kube.request("GET", f"/apis/{version}")["resources"]


def container_env(rendered: Rendered, component: str) -> dict[str, str]:
    """The plain environment the chart gives a component's container (valueFrom entries are the
    pod's own fields or mounted Secrets, supplied by the caller)."""
    (deployment,) = [
        d
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def container_args(rendered: Rendered, component: str) -> list[str]:
    (deployment,) = [
        d
        for d in rendered.of_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [str(a) for a in container.get("args", [])]


@dataclass
class Install:
    """One installed release: the rendered chart, and how to run its components."""

    kube: Kube
    bao: Bao
    release: str
    namespace: str
    rendered: Rendered
    workdir: Path
    processes: list[Process] = field(default_factory=list)

    def service_account(self, component: str) -> str:
        (sa,) = [
            s["metadata"]["name"]
            for s in self.rendered.of_kind("ServiceAccount")
            if s["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        return sa

    def token(self, component: str) -> str:
        return self.kube.service_account_token(self.namespace, self.service_account(component))

    def token_file(self, component: str) -> Path:
        """The component's projected token, as the pod would have it mounted (fresh each call)."""
        path = self.workdir / f"{component}-{uuid.uuid4().hex[:6]}.token"
        path.write_text(self.token(component))
        path.chmod(0o600)
        return path

    def env(self, component: str, **overrides: str) -> dict[str, str]:
        """The chart's environment for ``component``, with the cluster and Vault reached the way a
        pod would: the ServiceAccount's token, and Vault's Kubernetes login with that token."""
        token_file = self.token_file(component)
        kubeconfig = self.kube.kubeconfig_for_token(
            token_file.read_text(), self.workdir / f"{component}.kubeconfig", namespace=self.namespace
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "AWS_", "KUBE", "CLOUDCONNECTOR_", "CC_PROXY_"))
        }
        env.update(container_env(self.rendered, component))
        env.update(
            KUBECONFIG=str(kubeconfig),
            VAULT_ADDR=self.bao.url,
            CLOUDCONNECTOR_VAULT_JWT_FILE=str(token_file),
            POD_ID=f"{component}-{uuid.uuid4().hex[:5]}",
            AWS_EC2_METADATA_DISABLED="true",
            PYTHONUNBUFFERED="1",
        )
        env.update(overrides)
        return env

    def operator(self, **overrides: str) -> Process:
        """The operator as the chart configures it, quicker timers for tests unless overridden."""
        quick = {
            "CLOUDCONNECTOR_CONSISTENCY_TIMEOUT": "0.5",
            "CLOUDCONNECTOR_STATUS_INTERVAL": "1",
            "CLOUDCONNECTOR_CONFLICT_RECHECK": "1",
            "CLOUDCONNECTOR_ENDPOINT_RECHECK": "2",
            "CLOUDCONNECTOR_CREDENTIALS_RETRY": "2",
            "CLOUDCONNECTOR_LIVENESS": "",
        }
        env = self.env("operator", **{**quick, **overrides})
        args = container_args(self.rendered, "operator")
        proc = Process(
            [sys.executable, "-m", "cloudconnector.operator.main", *args],
            env,
            self.workdir / f"operator-{len(self.processes)}.log",
        )
        self.processes.append(proc)
        return proc.start()

    def proxy(self, mqtt_port: int | None = None, **overrides: str) -> tuple[Process, int]:
        """The proxy as the chart configures it, on a free plain-MQTT port (TLS and HTTP off
        unless overridden); returns the process and the device-facing port."""
        port = mqtt_port or free_port()
        settings = {
            "CC_PROXY_POD_NAME": f"{self.release}-proxy-{uuid.uuid4().hex[:5]}",  # the pod's name
            "CC_PROXY_BIND": "127.0.0.1",
            "CC_PROXY_MQTT_PORT": str(port),
            "CC_PROXY_TLS_PORT": "off",
            "CC_PROXY_HTTP_PORT": "off",
            **overrides,
        }
        env = self.env("proxy", **settings)
        args = container_args(self.rendered, "proxy")
        proc = Process(
            [sys.executable, "-m", "cloudconnector.proxy.main", *args],
            env,
            self.workdir / f"proxy-{len(self.processes)}.log",
        )
        self.processes.append(proc)
        return proc.start(), port

    def close(self) -> None:
        for proc in self.processes:
            proc.stop()
            for run in proc.runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()


def vault_for_chart(
    bao: Bao, kube: Kube, install_ns: str, values: Mapping[str, Any], sas: Mapping[str, str]
) -> hvac.Client:
    """Prepare OpenBao as docs/vault.md tells an operator of Vault to: engines and policies, and a
    Kubernetes auth method that reviews each component's token against this API server, with one
    role per component bound to the chart's ServiceAccount."""
    root = hvac.Client(url=bao.url, token=bao.token)
    roles = (values.get("vault") or {}).get("roles") or {}
    mount = f"k8s-{install_ns}"
    bootstrap(
        root,
        auth=[
            AuthSetup(
                method="kubernetes",
                mount=mount,
                config={
                    "kubernetes_host": kube.server,
                    "kubernetes_ca_cert": kube.ca_pem,
                    "disable_local_ca_jwt": True,
                },
                roles=(
                    AuthRole(
                        name=roles.get("operator", "cloud-connector-operator"),
                        policies=(OPERATOR_POLICY,),
                        service_accounts=(sas["operator"],),
                        namespaces=(install_ns,),
                    ),
                    AuthRole(
                        name=roles.get("proxy", "cloud-connector-proxy"),
                        policies=(PROXY_POLICY,),
                        service_accounts=(sas["proxy"],),
                        namespaces=(install_ns,),
                    ),
                ),
            )
        ],
    )
    return root


@contextlib.contextmanager
def install(
    kube: Kube, bao: Bao, workdir: Path, values: Mapping[str, Any] | None = None
) -> Iterator[Install]:
    """Render and apply the chart into a fresh namespace, with Vault's Kubernetes login set up for
    it. Default values: the chart's defaults plus what a local test needs (Vault over plain HTTP
    with Kubernetes auth at this install's mount, the reviewer rights of ``vault.authDelegator``,
    no 8883 certificate)."""
    release = f"e2e{uuid.uuid4().hex[:6]}"
    namespace = kube.namespace("cc-sys")
    mount = f"k8s-{namespace}"
    merged: dict[str, Any] = {
        "vault": {"address": bao.url, "authMethod": "kubernetes", "authMount": mount, "authDelegator": True},
        "proxy": {"tls": {"enabled": False}},
    }
    _merge(merged, dict(values or {}))
    rendered = render(load(), merged, release=release, namespace=namespace)
    apply_rendered(kube, rendered, namespace)
    inst = Install(kube, bao, release, namespace, rendered, workdir)
    sas = {c: inst.service_account(c) for c in ("operator", "proxy") if _has(rendered, c)}
    sas.setdefault("proxy", "none")
    vault_for_chart(bao, kube, namespace, merged, sas)
    try:
        yield inst
    finally:
        inst.close()


def _has(rendered: Rendered, component: str) -> bool:
    return any(
        s["metadata"]["labels"].get("app.kubernetes.io/component") == component
        for s in rendered.of_kind("ServiceAccount")
    )


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def wait_until(what: str, check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiError):
            last = check()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
