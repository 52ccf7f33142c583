"""A real Kubernetes API server for the tests: found or started once per run, never emulated.

Where the cluster comes from, in order:

1. ``CLOUDCONNECTOR_E2E_KUBECONFIG``: a kubeconfig of any real cluster (kind, k3d, EKS ...) whose
   user may create CRDs, namespaces, RBAC and service-account tokens. The suite installs the CRDs
   there and works in namespaces of its own, named ``cc-e2e-*``.
2. ``../shared/k8s/start`` beside the checkout (or ``CLOUDCONNECTOR_K8S_START``): a local
   kube-apiserver + etcd started for this run and stopped at its end.

With neither, tests that need the server are skipped with one line saying why, except under CI
(``CI=true``), where that is an error: CI must never skip the real-server tests.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
KUBECONFIG_ENV = "CLOUDCONNECTOR_E2E_KUBECONFIG"
START_ENV = "CLOUDCONNECTOR_K8S_START"
PLURALS = {"Endpoint": "endpoints", "Group": "groups", "Device": "devices"}
GROUP_VERSION = "cloudconnector.io/v1alpha1"


class Unavailable(RuntimeError):
    """No real API server can be had here; the message says why, in one line."""


@dataclass
class ApiError(Exception):
    """An API server's refusal: the HTTP status and its Status object's message."""

    status: int
    reason: str
    message: str
    body: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


@dataclass
class Kube:
    """One real cluster: a kubeconfig with cluster-admin rights, plus small helpers over it."""

    kubeconfig: Path
    server: str
    ca_pem: str
    workdir: Path
    admin_ssl: ssl.SSLContext = field(repr=False, default_factory=ssl.create_default_context)
    admin_token: str | None = field(default=None, repr=False)

    # --- kubectl ---------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; stdout and stderr are returned as text."""
        # A discovery cache of this run's own, so that it can be dropped when CRDs are installed.
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "KUBECACHEDIR": str(self.workdir / "kubectl-cache"),
        }
        done = subprocess.run(
            ["kubectl", *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def apply(self, *objs: Mapping[str, Any], server_side: bool = False) -> None:
        text = yaml.safe_dump_all([dict(o) for o in objs])
        extra = ["--server-side", "--force-conflicts"] if server_side else []
        self.kubectl("apply", *extra, "-f", "-", input=text)

    # --- REST, as cluster-admin ------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        token: str | None = None,
    ) -> Any:
        """One API request; returns the decoded JSON answer or raises :class:`ApiError`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        ctx = self.admin_ssl
        if token is not None:
            ctx = ssl.create_default_context(cadata=self.ca_pem)
        bearer = token or self.admin_token
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                status = json.loads(raw)
            except ValueError:
                status = {"message": raw.decode(errors="replace")}
            raise ApiError(
                e.code, str(status.get("reason", "")), str(status.get("message", "")), status
            ) from None
        return json.loads(raw) if raw else None

    @staticmethod
    def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{GROUP_VERSION}"
        if namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{PLURALS[kind]}"
        return base + (f"/{name}" if name else "")

    def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Any:
        """POST a Cloud Connector object; ``dry_run`` asks the server to validate only."""
        meta = obj.get("metadata") or {}
        path = self.path(str(obj["kind"]), meta.get("namespace"))
        return self.request("POST", path + ("?dryRun=All" if dry_run else ""), obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.request("GET", self.path(kind, namespace, name)))

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Any:
        return self.request(
            "PATCH", self.path(kind, namespace, name), patch, content_type="application/merge-patch+json"
        )

    def namespace(self, prefix: str = "cc-e2e") -> str:
        """A fresh namespace for one test (namespaces are never reused: deletion never finishes
        on a server without a controller-manager)."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        return name

    # --- identities ------------------------------------------------------------------------

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real, signed ServiceAccount token (TokenRequest), as a pod of that account gets."""
        answer = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds},
            },
        )
        return str(answer["status"]["token"])

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str | None = None) -> Path:
        """A kubeconfig file that authenticates with ``token`` only (no client certificate)."""
        context: dict[str, Any] = {"cluster": "e2e", "user": "sa"}
        if namespace:
            context["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(self.ca_pem.encode()).decode(),
                    },
                }
            ],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": context}],
            "current-context": "e2e",
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    # --- waiting ---------------------------------------------------------------------------

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll ``check()`` until it returns something truthy; its last value is in the error."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with contextlib.suppress(ApiError):
                last = check()
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
            time.sleep(interval)


def install_crds(kube: Kube, crd_dir: Path = CRDS) -> None:
    """Apply the CRDs and wait until each is Established and its schema is in force."""
    # The trailing slash follows a symlinked folder. Right after start the API's discovery may not
    # list apiextensions yet: kubectl then says "no matches for kind"; look again with a fresh cache.
    deadline = time.monotonic() + 60
    while True:
        done = kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", f"{crd_dir}/", check=False)
        if done.returncode == 0:
            break
        if "no matches for kind" not in done.stderr or time.monotonic() > deadline:
            raise AssertionError(f"kubectl apply -f {crd_dir}/ failed: {done.stderr.strip()}")
        shutil.rmtree(kube.workdir / "kubectl-cache", ignore_errors=True)
        time.sleep(0.5)
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                name = doc["metadata"]["name"]
                kube.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    # Established comes before the new schema is used for validation: probe until a known-bad
    # object is refused (the IPv4 leading-zero rule is the newest one).
    probe = {
        "apiVersion": GROUP_VERSION,
        "kind": "Device",
        "metadata": {"name": "schema-probe", "namespace": "default"},
        "spec": {"group": "g", "sim": {"iccid": "8900000000000000000"}, "ip": "010.0.0.1"},
    }

    def refused() -> bool:
        try:
            kube.create(probe, dry_run=True)
        except ApiError as e:
            return e.status == 422
        return False

    kube.wait("the CRD schemas to be in force", refused, timeout=30)
    # kubectl may have cached the API's discovery before the CRDs were there.
    shutil.rmtree(kube.workdir / "kubectl-cache", ignore_errors=True)


def _from_kubeconfig(path: Path, workdir: Path) -> Kube:
    doc = yaml.safe_load(path.read_text())
    ctx_name = doc.get("current-context")
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
    if "certificate-authority-data" in cluster:
        ca_pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
    else:
        ca_pem = Path(cluster["certificate-authority"]).read_text()
    ssl_ctx = ssl.create_default_context(cadata=ca_pem)
    if "client-certificate-data" in user:
        cert = workdir / "admin.crt"
        key = workdir / "admin.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        key.chmod(0o600)
        ssl_ctx.load_cert_chain(str(cert), str(key))
    elif "client-certificate" in user:
        ssl_ctx.load_cert_chain(user["client-certificate"], user["client-key"])
    return Kube(
        kubeconfig=path,
        server=str(cluster["server"]).rstrip("/"),
        ca_pem=ca_pem,
        workdir=workdir,
        admin_ssl=ssl_ctx,
        admin_token=user.get("token"),
    )


def _start_script() -> Path | None:
    override = os.environ.get(START_ENV)
    if override:
        return Path(override)
    candidate = REPO.parent / "shared" / "k8s" / "start"
    return candidate if candidate.exists() else None


@contextlib.contextmanager
def real_cluster() -> Iterator[Kube]:
    """The real cluster for this run (see the module docstring); raises :class:`Unavailable`."""
    if shutil.which("kubectl") is None:
        raise Unavailable("kubectl is not installed (scripts/bootstrap installs it)")
    workdir = Path(tempfile.mkdtemp(prefix="cc-k8s-"))
    try:
        given = os.environ.get(KUBECONFIG_ENV)
        if given:
            kube = _from_kubeconfig(Path(given), workdir)
            install_crds(kube)
            yield kube
            return
        start = _start_script()
        if start is None:
            raise Unavailable(
                f"no real API server: set {KUBECONFIG_ENV} to a cluster's kubeconfig, or put "
                "shared/k8s/start beside the checkout"
            )
        stop = start.with_name("stop")
        cluster_dir = workdir / "cluster"
        done = subprocess.run(
            [str(start), str(cluster_dir)], capture_output=True, text=True, timeout=300, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{start} failed: {done.stderr.strip()[-2000:]}")
        try:
            kube = _from_kubeconfig(cluster_dir / "admin.kubeconfig", workdir)
            # /readyz answers before every API group is served: wait for CRDs to be known.
            kube.wait(
                "the apiextensions API",
                lambda: kube.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"),
                timeout=60,
            )
            install_crds(kube)
            yield kube
        finally:
            subprocess.run([str(stop), str(cluster_dir)], capture_output=True, timeout=60, check=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def skip_or_fail(reason: str) -> None:
    """Skip with one line, unless this is CI, where a missing real API server is a failure."""
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real API server required in CI: {reason}", pytrace=False)
    pytest.skip(f"real API server tests skipped: {reason}")
