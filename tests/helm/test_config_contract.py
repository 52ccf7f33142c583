"""The environment the chart gives each container is exactly what the code reads: every variable
is parsed by the component's own settings class into the values the chart was given."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from cloudconnector.identity import Scope
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig
from cloudconnector.operator.config import OperatorConfig
from cloudconnector.proxy import config as proxy_config
from cloudconnector.proxy import main as proxy_main
from tests.helm.chart import REPO, Rendered, env_of, load, render

PROXY = "cc-cloud-connector-proxy"
OPERATOR = "cc-cloud-connector-operator"
# Set by Kubernetes from a Secret; a stand-in lets the settings class see that it is present.
FROM_SECRETS = {"VAULT_TOKEN": "stand-in"}
SOURCES = "\n".join(p.read_text() for p in (REPO / "cloudconnector").rglob("*.py"))
# kopf itself names its peering identity after the pod through POD_ID.
KOPF_READS = {"POD_ID"}


def _env(rendered: Rendered, deployment: str) -> dict[str, str]:
    container = rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    env.update({e["name"]: FROM_SECRETS[e["name"]] for e in container["env"] if e["name"] in FROM_SECRETS})
    return env


def test_every_variable_is_read_by_the_code(rendered: Rendered) -> None:
    proxy_fields = {f"CC_PROXY_{f.name.upper()}" for f in dataclasses.fields(proxy_config.ProxyConfig)}
    for deployment in rendered.of_kind("Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for var in (e["name"] for e in container["env"]):
            if var.startswith("CC_PROXY_"):
                assert var in proxy_fields, var
            else:
                read = var in KOPF_READS or f'"{var}"' in SOURCES
                assert read, f"{var} is set by the chart but read nowhere"


def test_proxy_settings_parse(renderings: dict[str, Rendered]) -> None:
    prod = proxy_config.from_mapping(_env(renderings["production"], PROXY))
    assert (prod.mqtt_port, prod.tls_port, prod.http_port) == (1883, 8883, 9090)
    assert prod.trusted_proxies == (ipaddress.ip_network("10.96.0.0/24"),)
    assert prod.identity == ("ip", "username")
    assert prod.tls_cert_file == "/etc/cloud-connector/tls/tls.crt"
    # No cap by default: each Endpoint's own limit applies (proxy/limits.py).
    assert prod.max_packet_size is None and prod.max_connections == 10000
    capped = {"proxy": {"limits": {"maxPacketSize": 131072}}}
    capped_env = _env(render(load(), capped), PROXY)
    assert proxy_config.from_mapping(capped_env).max_packet_size == 131072

    bare = proxy_config.from_mapping(_env(renderings["bare-metal"], PROXY))
    assert bare.mqtt_port is None and bare.tls_port == 8883
    assert bare.trusted_proxies == ()


def test_proxy_ports_match_the_container_ports(rendered: Rendered, scenario: str) -> None:
    if not any(d["metadata"]["name"] == PROXY for d in rendered.of_kind("Deployment")):
        assert scenario == "operator-only"  # the one value set that turns the proxy off
        return
    settings = proxy_config.from_mapping(_env(rendered, PROXY))
    container = rendered.one("Deployment", PROXY)["spec"]["template"]["spec"]["containers"][0]
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    listening = {"mqtt": settings.mqtt_port, "mqtts": settings.tls_port, "http": settings.http_port}
    assert declared == {k: v for k, v in listening.items() if v is not None}


@pytest.mark.parametrize(
    ("scenario_name", "expected"),
    [
        ("defaults", {"namespaces": (), "peering": None}),
        ("production", {"namespaces": ("fleet", "lab"), "peering": "cloud-connector"}),
        ("operator-only", {"namespaces": ("fleet",), "peering": None}),
    ],
)
def test_operator_settings_parse(
    renderings: dict[str, Rendered], scenario_name: str, expected: dict[str, Any]
) -> None:
    rendered = renderings[scenario_name]
    settings = OperatorConfig.from_env(_env(rendered, OPERATOR))
    assert {k: getattr(settings, k) for k in expected} == expected
    container = rendered.one("Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]
    probe_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    assert settings.liveness == f"http://0.0.0.0:{probe_port}/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_vault_settings_parse(renderings: dict[str, Rendered]) -> None:
    op = VaultConfig.from_env(_env(renderings["defaults"], OPERATOR))
    assert (op.auth, op.role, op.kv_mount, op.prefix, op.transit_mount) == (
        AuthMethod.KUBERNETES,
        "cloud-connector-operator",
        "secret",
        "cloud-connector",
        "transit",
    )
    assert op.ca_bundle is None

    proxy = VaultConfig.from_env(_env(renderings["production"], PROXY))
    assert proxy.role == "cloud-connector-proxy"
    assert proxy.jwt_file == Path("/var/run/secrets/vault/token")
    assert proxy.ca_bundle == Path("/etc/cloud-connector/vault-ca/ca.crt")

    token = VaultConfig.from_env(_env(renderings["bare-metal"], OPERATOR))
    assert token.auth is AuthMethod.TOKEN and token.address == "https://vault.example.net:8200"

    jwt = VaultConfig.from_env(_env(renderings["operator-only"], OPERATOR))
    assert (jwt.auth, jwt.login_mount) == (AuthMethod.JWT, "jwt-k8s")


def test_proxy_watches_what_its_rbac_allows(
    rendered: Rendered, scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not any(d["metadata"]["name"] == PROXY for d in rendered.of_kind("Deployment")):
        assert scenario == "operator-only"  # the one value set that turns the proxy off
        return
    container = rendered.one("Deployment", PROXY)["spec"]["template"]["spec"]["containers"][0]
    # The container's own environment and arguments, through the proxy's own parser.
    for name, value in _env(rendered, PROXY).items():
        monkeypatch.setenv(name, value)
    _, args = proxy_main.parse_args(container.get("args", []))
    roles = [r for r in rendered.of_kind("Role") if r["metadata"]["name"] == PROXY]
    cluster_roles = [r for r in rendered.of_kind("ClusterRole") if r["metadata"]["name"] == PROXY]
    # It serves exactly the operator's namespaces: that is where identities are unique.
    scope = Scope.parse(args.namespace)
    if any(d["metadata"]["name"] == OPERATOR for d in rendered.of_kind("Deployment")):
        assert scope == Scope.parse(OperatorConfig.from_env(_env(rendered, OPERATOR)).namespaces)
    if scope.single_namespace is None:
        assert len(cluster_roles) == 1 and roles == []
    else:
        assert cluster_roles == [] and [r["metadata"]["namespace"] for r in roles] == [scope.single_namespace]
    assert args.log_level == "info"
