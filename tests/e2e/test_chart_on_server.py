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
