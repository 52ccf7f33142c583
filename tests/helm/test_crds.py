"""The chart installs exactly the project's CRDs (crds/ at the repository root), byte for byte,
plus kopf's peering CRDs that the standby operator needs."""

from __future__ import annotations

import helm_python
import pytest
import yaml

from tests.helm.chart import CHART_DIR, REPO, Rendered

PROJECT_CRDS = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
PEERING_FILE = "kopf-peering.yaml"


def test_project_has_the_three_crds() -> None:
    assert PROJECT_CRDS == ["devices.yaml", "endpoints.yaml", "groups.yaml"]


@pytest.mark.parametrize("name", PROJECT_CRDS)
def test_chart_crd_is_identical_to_the_project_crd(name: str) -> None:
    chart_copy = CHART_DIR / "crds" / name
    assert chart_copy.exists(), f"copy crds/{name} to helm/cloud-connector/crds/"
    assert chart_copy.read_bytes() == (REPO / "crds" / name).read_bytes(), (
        f"helm/cloud-connector/crds/{name} differs from crds/{name}: copy it again"
    )


def test_chart_has_no_other_crds() -> None:
    in_chart = sorted(p.name for p in (CHART_DIR / "crds").iterdir())
    assert in_chart == sorted([*PROJECT_CRDS, PEERING_FILE])


def test_helm_loads_all_crds(chart: helm_python.Chart) -> None:
    loaded = {doc["metadata"]["name"] for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc}
    assert loaded == {
        "endpoints.cloudconnector.io",
        "groups.cloudconnector.io",
        "devices.cloudconnector.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }


def test_rbac_names_the_plurals_the_crds_define(renderings: dict[str, Rendered]) -> None:
    # The Roles grant rights by plural; a renamed plural in a CRD must not silently break them.
    plurals = set()
    for name in PROJECT_CRDS:
        doc = yaml.safe_load((REPO / "crds" / name).read_text())
        assert doc["spec"]["group"] == "cloudconnector.io"
        assert doc["spec"]["versions"][0]["subresources"]["status"] == {}
        plurals.add(doc["spec"]["names"]["plural"])
    granted = {
        resource.split("/")[0]
        for role in renderings["defaults"].of_kind("ClusterRole")
        for rule in role["rules"]
        if rule["apiGroups"] == ["cloudconnector.io"]
        for resource in rule["resources"]
    }
    assert granted == plurals
