"""The chart lints clean and every object it renders is valid Kubernetes, for each value set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import CHART_DIR, NAMESPACE, SCENARIOS, Rendered

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ("1.27", kubernetes_validate.latest_version())

# Kinds whose schemas come from other projects' CRDs, which kubernetes-validate does not carry.
# The kopf peering kinds are checked against the chart's own CRD below instead.
FOREIGN_KINDS = {("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


def _peering_schemas() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((CHART_DIR / "crds" / "kopf-peering.yaml").read_text())
    return {d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for d in docs}


def test_default_values_pass_the_schema(chart: helm_python.Chart) -> None:
    chart.validate_schema({})


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lint_is_clean(name: str) -> None:
    report = helm_python.lint(CHART_DIR, SCENARIOS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(rendered: Rendered, kube_version: str) -> None:
    peering = _peering_schemas()
    for obj in rendered.objects:
        where = f"{obj['kind']} {obj['metadata'].get('name')}"
        if obj["kind"] in peering:
            jsonschema.validate(obj, peering[obj["kind"]])
        elif (obj["apiVersion"], obj["kind"]) in FOREIGN_KINDS:
            assert obj["spec"], where
        else:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")


def test_validator_catches_an_unknown_field() -> None:
    # Strict validation is what makes the test above meaningful: a misplaced key must fail.
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1883}], "externalTrafficPolicyy": "Local"},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("path", sorted((CHART_DIR / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_chart_crds_are_valid_definitions(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_objects_are_namespaced_to_the_release(rendered: Rendered) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for obj in rendered.objects:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert ns is None, obj["metadata"]["name"]
        elif obj["kind"] not in ("Role", "RoleBinding", "KopfPeering"):
            assert ns == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"


def test_names_are_unique(rendered: Rendered) -> None:
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered.objects]
    assert len(keys) == len(set(keys))


def test_longest_release_name_gives_valid_names(chart: helm_python.Chart) -> None:
    release = "r" * 53  # Helm's limit for release names
    helm_python.validate_release_name(release)
    manifests = chart.render({}, name=release, namespace=NAMESPACE, is_install=True)
    objects = [
        d for path, text in manifests.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    assert objects
    for obj in objects:
        # Services and label values are DNS labels: at most 63 characters.
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values()), obj["metadata"]["name"]
