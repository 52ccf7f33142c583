"""The CRDs as a platform engineer meets them on a real API server: they install (both copies),
`kubectl explain` teaches every field, `kubectl get` shows the printer columns under the short
names and the category, and `kubectl wait` has a Ready condition to wait for."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.support.kube import CRDS, Kube

CHART_CRDS = Path(__file__).resolve().parents[2] / "helm" / "cloud-connector" / "crds"
SHORT = {"Endpoint": "cce", "Group": "ccg", "Device": "ccd"}


def crd_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(CRDS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        docs[doc["spec"]["names"]["kind"]] = doc
    return docs


def fields(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here, sub
        yield from fields(sub, here)
    if isinstance(schema.get("items"), Mapping):
        yield from fields(schema["items"], path)


def test_the_charts_crd_copies_install(kube: Kube) -> None:
    # The chart's copies of our CRDs are the ones installed (unchanged), and kopf's peering CRDs
    # that only the chart ships are accepted too.
    done = kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", f"{CHART_CRDS}/")
    assert done.stdout.count("serverside-applied") == len(list(CHART_CRDS.glob("*.yaml"))) or done.stdout
    for path in CHART_CRDS.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kube.kubectl("wait", "--for=condition=Established", f"crd/{doc['metadata']['name']}")


def test_every_field_is_explained(kube: Kube) -> None:
    # kubectl explain reads the server's published OpenAPI: check every field there, then ask
    # kubectl itself for one deep field of each kind, as a user would.
    openapi = kube.request("GET", "/openapi/v2")["definitions"]
    for kind, doc in crd_docs().items():
        published = openapi[f"io.cloudconnector.v1alpha1.{kind}"]
        assert published.get("description"), kind
        missing = []
        for path, _node in fields(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            if path == "metadata" or path.startswith("metadata."):
                continue
            node: Mapping[str, Any] = published
            for part in path.split("."):
                node = node.get("properties", {}).get(part) or node.get("items", {}).get(
                    "properties", {}
                ).get(part, {})
            if not node.get("description"):
                missing.append(path)
        assert missing == [], f"{kind}: fields without a description on the server: {missing}"
    deep = {"Endpoint": "spec.aws.region", "Group": "spec.endpointRef.name", "Device": "spec.sim.iccid"}
    for kind, path in deep.items():
        out = kube.kubectl("explain", f"{SHORT[kind]}.{path}").stdout
        assert "DESCRIPTION" in out and "FIELD" in out, out
        assert f"KIND:       {kind}" in out or f"KIND:     {kind}" in out, out


def test_get_shows_the_columns_under_short_names_and_the_category(kube: Kube) -> None:
    ns = kube.namespace()
    kube.apply(
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Endpoint",
            "metadata": {"name": "aws", "namespace": ns},
            "spec": {"type": "AwsIotCore", "aws": {"region": "eu-west-1"}},
        },
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Group",
            "metadata": {"name": "meters", "namespace": ns},
            "spec": {"endpointRef": {"name": "aws"}},
        },
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": "m1", "namespace": ns},
            "spec": {"group": "meters", "sim": {"iccid": "8935301234567890123"}, "ip": "10.64.0.17"},
        },
    )
    for kind, doc in crd_docs().items():
        columns = doc["spec"]["versions"][0]["additionalPrinterColumns"]
        plain = [c["name"].upper() for c in columns if not c.get("priority")]
        wide = [c["name"].upper() for c in columns]
        header = kube.kubectl("get", SHORT[kind], "-n", ns).stdout.splitlines()[0]
        assert header.split() == ["NAME", *" ".join(plain).split()], header
        wide_header = kube.kubectl("get", SHORT[kind], "-n", ns, "-o", "wide").stdout.splitlines()[0]
        assert wide_header.split() == ["NAME", *" ".join(wide).split()], wide_header
        plural = doc["spec"]["names"]["plural"]
        assert kube.kubectl("get", f"{plural}.cloudconnector.io", "-n", ns, "-o", "name").stdout.strip()
    listed = kube.kubectl("get", "cloudconnector", "-n", ns, "-o", "name").stdout.split()
    assert sorted(listed) == sorted(
        ["endpoint.cloudconnector.io/aws", "group.cloudconnector.io/meters", "device.cloudconnector.io/m1"]
    )
    # The Device shows its group and, with -o wide, its SIM identity.
    row = kube.kubectl("get", "ccd", "m1", "-n", ns, "-o", "wide", "--no-headers").stdout.split()
    assert "meters" in row and "10.64.0.17" in row and "8935301234567890123" in row


def test_wait_for_ready_is_answered_from_status_conditions(kube: Kube) -> None:
    # `kubectl wait --for=condition=Ready` reads status.conditions, which the status subresource
    # lets only a status writer set.
    ns = kube.namespace()
    kube.apply(
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Group",
            "metadata": {"name": "g", "namespace": ns},
            "spec": {"endpointRef": {"name": "aws"}},
        }
    )
    done = kube.kubectl("wait", "--for=condition=Ready", "ccg/g", "-n", ns, "--timeout=1s", check=False)
    assert done.returncode != 0
    kube.request(
        "PATCH",
        kube.path("Group", ns, "g") + "/status",
        {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned"}]}},
        content_type="application/merge-patch+json",
    )
    kube.kubectl("wait", "--for=condition=Ready", "ccg/g", "-n", ns, "--timeout=10s")


def test_spec_is_not_writable_through_status(kube: Kube) -> None:
    # The status subresource: a write to /status cannot change spec, so the operator's status
    # rights (RBAC on devices/status) never let it rewrite what a user applied.
    ns = kube.namespace()
    kube.apply(
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Group",
            "metadata": {"name": "g", "namespace": ns},
            "spec": {"endpointRef": {"name": "aws"}},
        }
    )
    kube.request(
        "PATCH",
        kube.path("Group", ns, "g") + "/status",
        {"spec": {"endpointRef": {"name": "other"}}, "status": {"total": 3}},
        content_type="application/merge-patch+json",
    )
    stored = kube.get("Group", ns, "g")
    assert stored["spec"]["endpointRef"]["name"] == "aws"
    assert stored["status"]["total"] == 3
