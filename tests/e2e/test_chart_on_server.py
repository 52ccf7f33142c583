"""Every documented values recipe of the chart, rendered by Helm and created for real on a real API
server (not a dry run): Services, Deployments, RBAC, PodDisruptionBudgets, autoscalers and
NetworkPolicies are all checked by the server itself. The chart's kubeVersion admits this server."""

from __future__ import annotations

import pytest
import yaml

from tests.e2e.harness import ADDON_KINDS, apply_rendered
from tests.helm.chart import CHART_DIR, SCENARIOS, load, render
from tests.support.kube import Kube


def _server_version(kube: Kube) -> tuple[int, int]:
    info = kube.request("GET", "/version")
    return int(info["major"]), int(str(info["minor"]).rstrip("+"))


def test_kube_version_admits_the_oldest_server_we_test_on(kube: Kube) -> None:
    constraint = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    major, minor = _server_version(kube)
    lowest = constraint.removeprefix(">=").split("-")[0].split(".")
    assert (int(lowest[0]), int(lowest[1])) <= (major, minor), (constraint, major, minor)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_recipe_is_created_by_the_server(kube: Kube, scenario: str) -> None:
    namespace = kube.namespace("chart")
    release = f"r{abs(hash(scenario)) % 10**6}"
    rendered = render(load(), SCENARIOS[scenario], release=release, namespace=namespace)
    skipped = apply_rendered(kube, rendered, namespace)
    # Only add-on objects (Prometheus Operator, cert-manager) are left to clusters that have them.
    assert {o["kind"] for o in skipped} <= ADDON_KINDS
    for obj in rendered.objects:
        if obj["kind"] in ADDON_KINDS:
            continue
        args = ["get", obj["kind"].lower(), obj["metadata"]["name"], "-o", "name"]
        ns = obj["metadata"].get("namespace") or (
            namespace if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"} else None
        )
        if ns:
            args += ["-n", ns]
        assert kube.kubectl(*args).stdout.strip(), obj["metadata"]["name"]


FIXED_ADDRESSES = {
    # Devices inside the cluster network dial a fixed cluster address.
    "clusterIP": (
        {"service": {"type": "ClusterIP", "clusterIP": "10.96.200.10"}},
        "clusterIP",
        "10.96.200.10",
    ),
    # A cloud load balancer asked for a reserved address.
    "loadBalancerIP": (
        {"service": {"type": "LoadBalancer", "loadBalancerIP": "198.18.8.3"}},
        "loadBalancerIP",
        "198.18.8.3",
    ),
    # Bare metal: an address routed to the nodes.
    "externalIPs": (
        {"service": {"type": "NodePort", "externalIPs": ["198.18.8.4"]}},
        "externalIPs",
        ["198.18.8.4"],
    ),
}


@pytest.mark.parametrize("way", sorted(FIXED_ADDRESSES))
def test_the_device_address_survives_upgrade_and_reinstall(kube: Kube, way: str) -> None:
    values, field, expected = FIXED_ADDRESSES[way]
    namespace = kube.namespace("addr")
    release = "cc"
    chart = load()

    def service() -> dict:
        rendered = render(chart, values, release=release, namespace=namespace)
        (svc,) = [s for s in rendered.of_kind("Service") if not s["metadata"]["name"].endswith("-metrics")]
        return svc

    name = service()["metadata"]["name"]

    def served() -> object:
        return kube.request("GET", f"/api/v1/namespaces/{namespace}/services/{name}")["spec"].get(field)

    apply_rendered(kube, render(chart, values, release=release, namespace=namespace), namespace)
    assert served() == expected
    # An upgrade that changes other settings keeps the address.
    upgraded = {**values, "proxy": {"replicas": 4, "limits": {"maxConnections": 20000}}}
    apply_rendered(kube, render(chart, upgraded, release=release, namespace=namespace), namespace)
    assert served() == expected
    # Uninstall and install again: the same address comes back.
    kube.request("DELETE", f"/api/v1/namespaces/{namespace}/services/{name}")
    apply_rendered(kube, render(chart, values, release=release, namespace=namespace), namespace)
    assert served() == expected
