"""Logging in as users and pods do, against the real API server: a kubeconfig whose user is an
``exec`` plugin (what ``aws eks get-token``, ``gke-gcloud-auth-plugin`` and ``kubelogin`` are), a
token file that rotates, and a ServiceAccount without RBAC refused with a clear error."""

from __future__ import annotations

import base64
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconnector.kube.client import KubeClient, KubeError, Resource
from cloudconnector.kube.config import KubeConfig, KubeLoginError, kopf_connection_info
from tests.support.kube import ApiError, Kube

DEVICES = Resource("cloudconnector.io", "v1alpha1", "devices")

# Prints an ExecCredential whose token is the next line of TOKENS (the last one once all are used),
# valid for an hour if EXPIRES is given, and counts its runs in CALLS: what a cloud's token plugin
# (aws eks get-token, gke-gcloud-auth-plugin) does, minus the cloud.
PLUGIN = textwrap.dedent(
    """\
    import datetime, json, pathlib, sys
    tokens = pathlib.Path(sys.argv[1]).read_text().split()
    calls = pathlib.Path(sys.argv[2])
    n = int(calls.read_text()) if calls.exists() else 0
    calls.write_text(str(n + 1))
    if not tokens:
        sys.exit("no token for you")
    status = {"token": tokens[min(n, len(tokens) - 1)]}
    if len(sys.argv) > 3:
        hour = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        status["expirationTimestamp"] = hour.strftime("%Y-%m-%dT%H:%M:%SZ")
    print(json.dumps({
        "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status,
    }))
    """
)


def _service_account(kube: Kube, ns: str, name: str) -> None:
    kube.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )


def _grant_device_reads(kube: Kube, ns: str, *accounts: str) -> None:
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-devices", "namespace": ns},
            "rules": [
                {
                    "apiGroups": ["cloudconnector.io"],
                    "resources": ["devices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "read-devices", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-devices"},
            "subjects": [{"kind": "ServiceAccount", "name": a, "namespace": ns} for a in accounts],
        },
    )


def _device(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "cloudconnector.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"group": "meters", "sim": {"iccid": "8935301234567890123"}, "ip": "10.64.0.17"},
    }


def _kubeconfig(kube: Kube, path: Path, user: dict[str, Any], namespace: str) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "real",
                "cluster": {
                    "server": kube.server,
                    "certificate-authority-data": base64.b64encode(kube.ca_pem.encode()).decode(),
                },
            }
        ],
        "users": [{"name": "someone", "user": user}],
        "contexts": [
            {"name": "work", "context": {"cluster": "real", "user": "someone", "namespace": namespace}}
        ],
        "current-context": "work",
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def _exec_user(tmp: Path, tokens: list[str], *, expires: bool = False) -> tuple[dict[str, Any], Path]:
    plugin, token_list, calls = tmp / "plugin.py", tmp / "tokens", tmp / "calls"
    plugin.write_text(PLUGIN)
    token_list.write_text("\n".join(tokens))
    args = [str(plugin), str(token_list), str(calls), *(["expires"] if expires else [])]
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": args,
            "interactiveMode": "Never",
        }
    }
    return user, calls


@pytest.fixture
def fleet_ns(kube: Kube) -> str:
    ns = kube.namespace("cc-login")
    for account in ("reader", "nobody", "rotated-out", "rotated-in"):
        _service_account(kube, ns, account)
    _grant_device_reads(kube, ns, "reader", "rotated-out", "rotated-in")
    kube.create(_device(ns, "meter-0001"))
    return ns


async def test_exec_plugin_user_lists_devices(kube: Kube, fleet_ns: str, tmp_path: Path) -> None:
    token = kube.service_account_token(fleet_ns, "reader")
    user, calls = _exec_user(tmp_path, [token])
    config = KubeConfig.from_env({"KUBECONFIG": str(_kubeconfig(kube, tmp_path / "config", user, fleet_ns))})
    assert config.server == kube.server and config.default_namespace == fleet_ns
    assert token not in repr(config)
    client = KubeClient(config)
    try:
        names = [d["metadata"]["name"] for d in await client.list(DEVICES, fleet_ns)]
    finally:
        await client.aclose()
    assert names == ["meter-0001"]
    assert calls.read_text() == "1"  # the plugin ran once, and its token was used for the list


@pytest.mark.parametrize("expires", [False, True], ids=["no-expiry", "claims-an-hour"])
async def test_refused_exec_credential_is_fetched_again(
    kube: Kube, fleet_ns: str, tmp_path: Path, expires: bool
) -> None:
    # The plugin's first answer is a token the server no longer accepts (a ServiceAccount since
    # deleted), even if it claims to be good for an hour; the 401 makes the client run the plugin
    # again and retry with the new token.
    gone = kube.service_account_token(fleet_ns, "rotated-out")
    kube.request("DELETE", f"/api/v1/namespaces/{fleet_ns}/serviceaccounts/rotated-out")
    _wait_refused(kube, gone, fleet_ns)
    tokens = [gone, kube.service_account_token(fleet_ns, "reader")]
    user, calls = _exec_user(tmp_path, tokens, expires=expires)
    config = KubeConfig.from_env({"KUBECONFIG": str(_kubeconfig(kube, tmp_path / "config", user, fleet_ns))})
    client = KubeClient(config)
    try:
        assert [d["metadata"]["name"] for d in await client.list(DEVICES, fleet_ns)] == ["meter-0001"]
    finally:
        await client.aclose()
    assert calls.read_text() == "2"


async def test_rotated_token_file_is_read_again(kube: Kube, fleet_ns: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    old = kube.service_account_token(fleet_ns, "rotated-out")
    token_file.write_text(old)
    path = _kubeconfig(kube, tmp_path / "config", {"tokenFile": str(token_file)}, fleet_ns)
    client = KubeClient(KubeConfig.from_env({"KUBECONFIG": str(path)}))
    try:
        assert len(await client.list(DEVICES, fleet_ns)) == 1
        # Rotation: a new token lands in the file and the old one stops being valid.
        token_file.write_text(kube.service_account_token(fleet_ns, "rotated-in"))
        kube.request("DELETE", f"/api/v1/namespaces/{fleet_ns}/serviceaccounts/rotated-out")
        _wait_refused(kube, old, fleet_ns)
        assert len(await client.list(DEVICES, fleet_ns)) == 1
    finally:
        await client.aclose()


async def test_account_without_rbac_is_refused_clearly(kube: Kube, fleet_ns: str, tmp_path: Path) -> None:
    token = kube.service_account_token(fleet_ns, "nobody")
    user, _ = _exec_user(tmp_path, [token])
    config = KubeConfig.from_env({"KUBECONFIG": str(_kubeconfig(kube, tmp_path / "config", user, fleet_ns))})
    client = KubeClient(config)
    try:
        with pytest.raises(KubeError) as caught:
            await client.list(DEVICES, fleet_ns)
    finally:
        await client.aclose()
    message = str(caught.value)
    assert caught.value.status == 403
    assert f"system:serviceaccount:{fleet_ns}:nobody" in message
    assert 'cannot list resource "devices"' in message
    assert token not in message


async def test_failing_plugin_is_named_not_hidden(kube: Kube, fleet_ns: str, tmp_path: Path) -> None:
    user, _ = _exec_user(tmp_path, [])  # the plugin exits non-zero, as a logged-out CLI does
    path = _kubeconfig(kube, tmp_path / "config", user, fleet_ns)
    client = KubeClient(KubeConfig.from_env({"KUBECONFIG": str(path)}))
    try:
        with pytest.raises(KubeError, match=r"exec: process returned 1\. no token for you"):
            await client.list(DEVICES, fleet_ns)
    finally:
        await client.aclose()


def test_kubeconfig_without_the_named_context_is_refused(kube: Kube, tmp_path: Path) -> None:
    path = kube.kubeconfig_for_token("x", tmp_path / "config")
    with pytest.raises(KubeLoginError, match="kubeconfig"):
        KubeConfig.from_env({"KUBECONFIG": str(path), "CLOUDCONNECTOR_K8S_CONTEXT": "elsewhere"})


async def test_kopf_logs_in_with_the_same_credentials(kube: Kube, fleet_ns: str, tmp_path: Path) -> None:
    token = kube.service_account_token(fleet_ns, "reader")
    user, _ = _exec_user(tmp_path, [token], expires=True)
    path = _kubeconfig(kube, tmp_path / "config", user, fleet_ns)
    info = await kopf_connection_info(KubeConfig.from_env({"KUBECONFIG": str(path)}))
    assert (info.server, info.scheme, info.token) == (kube.server, "Bearer", token)
    assert info.default_namespace == fleet_ns
    # kopf learns when the plugin's credential runs out, and logs in again before then.
    assert info.expiration is not None
    assert 3500 < (info.expiration - datetime.now(UTC)).total_seconds() <= 3600
    assert info.ca_path is not None and _text(info.ca_path) == kube.ca_pem.strip()


def _text(path: str) -> str:
    return Path(path).read_text().strip()


async def test_in_cluster_account_follows_its_rotating_token(
    kube: Kube, fleet_ns: str, tmp_path: Path
) -> None:
    # What the kubelet mounts into a pod: token, ca.crt and namespace; it rewrites the token file
    # before the old token expires.
    mount = tmp_path / "serviceaccount"
    mount.mkdir()
    old = kube.service_account_token(fleet_ns, "rotated-out")
    (mount / "token").write_text(old)
    (mount / "ca.crt").write_text(kube.ca_pem)
    (mount / "namespace").write_text(fleet_ns)
    host, port = kube.server.removeprefix("https://").rsplit(":", 1)
    env = {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "CLOUDCONNECTOR_K8S_SA_DIR": str(mount),
    }
    config = KubeConfig.from_env(env)
    assert config.default_namespace == fleet_ns and old not in repr(config)
    client = KubeClient(config)
    try:
        assert len(await client.list(DEVICES, fleet_ns)) == 1
        (mount / "token").write_text(kube.service_account_token(fleet_ns, "rotated-in"))
        kube.request("DELETE", f"/api/v1/namespaces/{fleet_ns}/serviceaccounts/rotated-out")
        _wait_refused(kube, old, fleet_ns)
        assert len(await client.list(DEVICES, fleet_ns)) == 1
    finally:
        await client.aclose()


def _wait_refused(kube: Kube, token: str, ns: str) -> None:
    def refused() -> bool:
        try:
            kube.request("GET", f"/apis/cloudconnector.io/v1alpha1/namespaces/{ns}/devices", token=token)
        except ApiError as e:
            return e.status == 401
        return False

    kube.wait("the deleted account's token to be refused", refused, timeout=30)
