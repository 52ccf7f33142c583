"""Security invariants that hold whatever the values: hardened pods, least-privilege RBAC, and
NetworkPolicies that let devices in only from their networks."""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.helm.chart import SCENARIOS, Rendered

WILDCARD = "*"
DANGEROUS_VERBS = {"escalate", "bind", "impersonate", "*"}
PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def test_pods_are_hardened(rendered: Rendered) -> None:
    for name, pod in rendered.pod_specs():
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] > 0 and psc["runAsGroup"] > 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod.get("volumes", [])), name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["privileged"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["runAsNonRoot"] is True, (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
            assert c.get("livenessProbe") or c.get("startupProbe"), (name, c["name"])


def _rules(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']} {o['metadata'].get('namespace', '')}/{o['metadata']['name']}", rule)
        for o in rendered.of_kind("ClusterRole") + rendered.of_kind("Role")
        for rule in o["rules"]
    ]


def test_rbac_has_no_wildcards_or_escalation(rendered: Rendered) -> None:
    for where, rule in _rules(rendered):
        assert "nonResourceURLs" not in rule, where
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert WILDCARD not in rule.get(key, []), (where, key)
            assert all(WILDCARD not in str(v) for v in rule.get(key, [])), (where, key)
        assert not DANGEROUS_VERBS & set(rule["verbs"]), where
        # Nobody may write Secrets, and nobody may list or watch them (that would read them all).
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], where


def test_proxy_reads_the_custom_resources_and_writes_only_connection_status(rendered: Rendered) -> None:
    for where, rule in _rules(rendered):
        if "-proxy" in where:
            assert rule["apiGroups"] == ["cloudconnector.io"], where
            if rule["resources"] == ["devices/status"]:  # status.connection, never spec
                assert rule["verbs"] == ["patch"], where
                continue
            assert set(rule["resources"]) == {"endpoints", "groups", "devices"}, where
            assert set(rule["verbs"]) == {"get", "list", "watch"}, where


def test_operator_writes_only_its_own_resources(rendered: Rendered) -> None:
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    for where, rule in _rules(rendered):
        if "-operator" not in where or not writes & set(rule["verbs"]):
            continue
        if rule["resources"] == ["events"]:
            continue
        assert rule["apiGroups"] in (["cloudconnector.io"], ["kopf.dev"]), where
        # It patches its objects (status, finalizers) but never creates or deletes them.
        assert not {"create", "delete", "deletecollection"} & set(rule["verbs"]), where


def test_secret_access_is_namespaced_unless_asked(renderings: dict[str, Rendered]) -> None:
    def secret_rules(r: Rendered) -> list[str]:
        return [where for where, rule in _rules(r) if "secrets" in rule["resources"]]

    assert secret_rules(renderings["defaults"]) == [
        "Role cloud-connector/cc-cloud-connector-operator-secrets"
    ]
    assert secret_rules(renderings["bare-metal"]) == ["ClusterRole /cc-cloud-connector-operator"]
    assert sorted(secret_rules(renderings["operator-only"])) == [
        "Role credentials/cc-cloud-connector-operator-secrets",
        "Role fleet/cc-cloud-connector-operator-secrets",
    ]
    # Watched namespaces, limited by name.
    prod = [rule for _, rule in _rules(renderings["production"]) if "secrets" in rule["resources"]]
    assert len(prod) == 2 and all(r["resourceNames"] == ["aws-iam", "azure-registry"] for r in prod)


def _policy(rendered: Rendered, component: str) -> dict[str, Any]:
    return rendered.one("NetworkPolicy", f"cc-cloud-connector-{component}")


def test_network_policies_cover_every_component(rendered: Rendered, scenario: str) -> None:
    values = SCENARIOS[scenario]
    if values.get("networkPolicy", {}).get("enabled") is False:
        assert rendered.of_kind("NetworkPolicy") == []
        return
    for dep in rendered.of_kind("Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [
            p
            for p in rendered.of_kind("NetworkPolicy")
            if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, dep["metadata"]["name"]
        assert covering[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_devices_reach_only_the_mqtt_ports_from_their_networks(renderings: dict[str, Rendered]) -> None:
    prod = _policy(renderings["production"], "proxy")["spec"]["ingress"]
    device_rule = next(r for r in prod if {"protocol": "TCP", "port": 1883} in r["ports"])
    sources = sorted(peer["ipBlock"]["cidr"] for peer in device_rule["from"])
    assert sources == ["10.64.0.0/16", "10.96.0.0/24"]  # device APN + the trusted load balancer
    assert sorted(p["port"] for p in device_rule["ports"]) == [1883, 8883]
    metrics_rule = next(r for r in prod if r is not device_rule)
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert _policy(renderings["defaults"], "operator")["spec"]["ingress"] == []


def test_egress_is_limited_to_dns_api_vault_and_clouds(rendered: Rendered, scenario: str) -> None:
    if not rendered.of_kind("NetworkPolicy"):
        return
    for policy in rendered.of_kind("NetworkPolicy"):
        for rule in policy["spec"]["egress"]:
            # Every rule names its ports: no rule opens all traffic.
            assert rule.get("ports"), policy["metadata"]["name"]
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and ipaddress.ip_network(block["cidr"]).prefixlen == 0:
                    # The open internet is allowed only for the clouds, never into private ranges.
                    excluded = [ipaddress.ip_network(n) for n in block.get("except", [])]
                    assert all(p in excluded for p in PRIVATE), policy["metadata"]["name"]
                    assert {p["port"] for p in rule["ports"]} <= {443, 8883}


def test_production_egress_pins_api_server_and_vault(renderings: dict[str, Rendered]) -> None:
    egress = _policy(renderings["production"], "operator")["spec"]["egress"]
    pinned = [r["to"] for r in egress if r["ports"] == [{"protocol": "TCP", "port": 443}]]
    assert [{"ipBlock": {"cidr": "172.20.0.10/32"}}] in pinned
    vault = next(r for r in egress if r["ports"] == [{"protocol": "TCP", "port": 8200}])
    assert vault["to"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vault"}
