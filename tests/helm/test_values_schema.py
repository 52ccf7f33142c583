"""values.schema.json turns mistakes into clear errors at install time, and the templates refuse
combinations a schema cannot express (with a message that says what to do)."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from tests.helm.chart import NAMESPACE, RELEASE

PDB = "/proxy/podDisruptionBudget"
CA = "/vault/ca/pem"  # a private key pasted here by mistake must not be accepted

# (values, the path Helm names, words the message must contain)
# A private key pasted where the CA belongs. Spelled from parts so that the repository holds no
# PEM-shaped key block for secret scanners to flag; the value is the same.
_KEY_LABEL = "PRIVATE" + " KEY"
KEY_PASTED_AS_CA = f"-----BEGIN {_KEY_LABEL}-----\nx\n-----END {_KEY_LABEL}-----"

BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    ({"podUser": {"runAsUser": 0}}, "/podUser/runAsUser", "minimum"),
    ({"service": {"type": "ExternalName"}}, "/service/type", "LoadBalancer"),
    ({"service": {"loadBalancerIP": "198.18.8.300"}}, "/service/loadBalancerIP", "pattern"),
    ({"service": {"externalIPs": ["mqtt.example.net"]}}, "/service/externalIPs/0", "pattern"),
    ({"service": {"externalTrafficPolicy": "local"}}, "/service/externalTrafficPolicy", "Local"),
    ({"networkPolicy": {"deviceCIDRs": ["10.64.0.0"]}}, "/networkPolicy/deviceCIDRs/0", "pattern"),
    ({"networkPolicy": {"deviceCIDRs": []}}, "/networkPolicy/deviceCIDRs", "minItems"),
    ({"proxy": {"ports": {"mqtt": 80}}}, "/proxy/ports/mqtt", "1,024"),
    ({"proxy": {"identity": ["iccid"]}}, "/proxy/identity/0", "client_id"),
    ({"proxy": {"limits": {"maxPacketSize": 300_000_000}}}, "/proxy/limits/maxPacketSize", "maximum"),
    ({"proxy": {"tls": {"source": "inline"}}}, "/proxy/tls/source", "certManager"),
    (
        {"proxy": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
        "/proxy/podDisruptionBudget/maxUnavailable",
        "pattern",
    ),
    ({"operator": {"replicas": 3}}, "/operator/replicas", "maximum"),
    ({"operator": {"watchNamespaces": ["Fleet"]}}, "/operator/watchNamespaces/0", "pattern"),
    ({"operator": {"image": {"digest": "latest"}}}, "/operator/image/digest", "pattern"),
    ({"vault": {"address": "vault:8200"}}, "/vault/address", "pattern"),
    ({"vault": {"authMethod": "approle"}}, "/vault/authMethod", "kubernetes"),
    ({"vault": {"kvMount": "/secret/"}}, "/vault/kvMount", "pattern"),
    (
        {"vault": {"ca": {"pem": KEY_PASTED_AS_CA}}},
        "/vault/ca/pem",
        "",
    ),
    ({"proxy": {"replica": 3}}, "/proxy", "'replica' not allowed"),
    ({"sevice": {"type": "ClusterIP"}}, "", "'sevice' not allowed"),
]


@pytest.mark.parametrize(("values", "path", "words"), BAD_VALUES, ids=lambda v: str(v)[:60])
def test_schema_rejects_bad_values(
    chart: helm_python.Chart, values: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        chart.validate_schema(values)
    message = str(caught.value)
    assert f"at '{path}'" in message and words in message, message


def test_install_is_refused_with_bad_values(chart: helm_python.Chart) -> None:
    # Rendering for install applies the same schema, so a bad value never reaches the cluster.
    with pytest.raises(helm_python.HelmValuesError, match="/service/type"):
        chart.render(
            {"service": {"type": "ExternalName"}}, name=RELEASE, namespace=NAMESPACE, is_install=True
        )


# Cross-field rules, enforced in the templates with `fail`.
BAD_COMBINATIONS: list[tuple[dict[str, Any], str]] = [
    ({"operator": {"replicas": 2}}, "needs operator.peering.enabled"),
    ({"proxy": {"proxyProtocol": {"enabled": True}}}, "proxy.proxyProtocol.trustedCIDRs is required"),
    ({"proxy": {"plainMqtt": False, "tls": {"enabled": False}}}, "at least one device listener"),
    ({"proxy": {"tls": {"source": "certManager"}}}, "needs dnsNames or ipAddresses"),
    (
        {"proxy": {"tls": {"source": "certManager", "certManager": {"dnsNames": ["mqtt.example.net"]}}}},
        "issuerRef.name is required",
    ),
    ({"vault": {"authMethod": "token"}}, "name is required when vault.authMethod is token"),
    ({"operator": {"serviceAccount": {"create": False}}}, "operator.serviceAccount.name is required"),
]


@pytest.mark.parametrize(("values", "words"), BAD_COMBINATIONS, ids=lambda v: str(v)[:60])
def test_templates_refuse_bad_combinations(
    chart: helm_python.Chart, values: dict[str, Any], words: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert words in str(caught.value)
