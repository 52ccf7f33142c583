"""Render the chart with Helm's own Go code (helm-python-sdk) and hand the tests plain objects.

Rendering is offline: no cluster, and the ``lookup`` function returns nothing, which the chart
never uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "cloud-connector"
RELEASE = "cc"
NAMESPACE = "cloud-connector"

# Representative value sets: each exercises a different way a platform team installs the product.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # Active/standby operator limited to two namespaces, autoscaled proxy behind a cloud load
    # balancer that sends PROXY protocol, cert-manager certificate, Prometheus Operator, Vault in
    # the cluster with its own CA and an audience-bound login token.
    "production": {
        "operator": {
            "replicas": 2,
            "peering": {"enabled": True},
            "watchNamespaces": ["fleet", "lab"],
            "secretAccess": {"resourceNames": ["aws-iam", "azure-registry"]},
        },
        "proxy": {
            "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
            "proxyProtocol": {"enabled": True, "trustedCIDRs": ["10.96.0.0/24"]},
            "identity": ["ip", "username"],
            "tls": {
                "source": "certManager",
                "certManager": {
                    "issuerRef": {"name": "private-ca"},
                    "dnsNames": ["mqtt.iot.example.net"],
                    "ipAddresses": ["198.18.8.3"],
                },
            },
        },
        "service": {
            "loadBalancerIP": "198.18.8.3",
            "externalTrafficPolicy": "Cluster",
            "annotations": {"service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"},
        },
        "vault": {
            "address": "https://vault.vault.svc:8200",
            "jwtAudience": "vault",
            "ca": {"secretName": "vault-ca", "key": "ca.crt"},
        },
        "networkPolicy": {
            "deviceCIDRs": ["10.64.0.0/16"],
            "apiServer": {"cidrs": ["172.20.0.10/32"], "ports": [443]},
            "vault": {
                "peers": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vault"}},
                    }
                ]
            },
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    # Bare metal: the fixed device address is routed to the nodes (externalIPs on a NodePort
    # Service, so externalTrafficPolicy Local keeps device addresses), TLS only, Vault
    # outside the cluster reached with a token, and Secrets readable in any namespace (opt-in).
    "bare-metal": {
        "service": {"type": "NodePort", "externalIPs": ["198.18.8.3"]},
        "proxy": {"plainMqtt": False, "replicas": 3, "tls": {"secretName": "mqtt-server-tls"}},
        "operator": {"secretAccess": {"clusterWide": True}},
        "vault": {
            "address": "https://vault.example.net:8200",
            "authMethod": "token",
            "tokenSecret": {
                "operator": {"name": "vault-token-operator"},
                "proxy": {"name": "vault-token-proxy"},
            },
            "ca": {"pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
            "authDelegator": True,
        },
        "networkPolicy": {"vault": {"cidrs": ["203.0.113.10/32"]}},
        "global": {"imageRegistry": "registry.example.net/mirror"},
    },
    # One fleet namespace: operator and proxy both limited to it by Roles.
    "one-namespace": {
        "operator": {"watchNamespaces": ["fleet"]},
        "proxy": {"autoscaling": {"enabled": True}, "podDisruptionBudget": {"maxUnavailable": "25%"}},
    },
    # Only the Cloud Account Manager (devices use another proxy), plain MQTT only, no policies.
    "operator-only": {
        "proxy": {"enabled": False},
        "operator": {
            "image": {"digest": "sha256:" + "ab" * 32},
            "watchNamespaces": ["fleet"],
            "secretAccess": {"namespaces": ["fleet", "credentials"]},
        },
        "networkPolicy": {"enabled": False},
        "vault": {"authMethod": "jwt", "authMount": "jwt-k8s"},
    },
}


@dataclass(frozen=True)
class Rendered:
    """All objects of one rendering, in template order."""

    objects: tuple[dict[str, Any], ...]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def pod_specs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for obj in self.of_kind("Deployment"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def load() -> helm_python.Chart:
    return helm_python.Chart.load(CHART_DIR)


def render(
    chart: helm_python.Chart, values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(tuple(objects), notes)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain-value environment variables."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
