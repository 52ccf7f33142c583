"""More of the operator's scenarios in standalone mode: conflicts, rotation, removing everything,
and Endpoint credentials from the environment instead of a Secret file."""

from __future__ import annotations

from cloudconnector.model import ObjectRef
from cloudconnector.standalone.app import Standalone
from tests.standalone.conftest import Site
from tests.standalone.test_cli_restart import phases, run_cli


async def test_duplicate_ip_is_a_conflict_for_both(site: Site, instance: Standalone) -> None:
    site.write("endpoint.yaml", [*site.endpoint(), site.group("meters")])
    site.write("devices.yaml", [site.device(0, ip="10.9.9.9"), site.device(1, ip="10.9.9.9")])
    await instance.runner.run_until_settled(limit=30)
    assert {o.status.get("phase") for o in instance.store.list("Device")} == {"Conflict"}
    assert site.things() == []
    assert instance.directory.routes() == []
    # Resolving the clash provisions both.
    site.write("devices.yaml", [site.device(0, ip="10.9.9.9"), site.device(1, ip="10.9.9.10")])
    await instance.runner.run_until_settled(limit=30)
    assert {o.status.get("phase") for o in instance.store.list("Device")} == {"Ready"}
    assert len(site.things()) == 2


async def test_identities_are_unique_across_namespaces(site: Site, instance: Standalone) -> None:
    # One standalone proxy serves every namespace of the store: two tenants' Devices may not share
    # an address (in any spelling) or a SIM.
    tenant = Site(site.manifests, site.state, site.moto_url, site.prefix, namespace="tenant-b")
    site.write("endpoint.yaml", [*site.endpoint(), site.group("meters")])
    site.write("tenant-b.yaml", [*tenant.endpoint(), tenant.group("meters")])
    mapped = tenant.device(0)
    mapped["spec"]["ip"] = f"::ffff:{mapped['spec']['ip']}"
    same_sim = tenant.device(2, ip="10.99.0.2")
    same_sim["spec"]["sim"] = site.device(1)["spec"]["sim"]
    site.write("devices.yaml", [site.device(0), site.device(1), site.device(3)])
    site.write("tenant-b-devices.yaml", [mapped, same_sim, tenant.device(4)])
    await instance.runner.run_until_settled(limit=30)
    phases = {str(o.ref): o.status.get("phase") for o in instance.store.list("Device")}
    assert phases == {
        "fleet/meter-0000": "Conflict",
        "fleet/meter-0001": "Conflict",
        "fleet/meter-0003": "Ready",
        "tenant-b/meter-0000": "Conflict",
        "tenant-b/meter-0002": "Conflict",
        "tenant-b/meter-0004": "Ready",
    }
    message = instance.store.get("Device", ObjectRef("fleet", "meter-0000")).status["message"]  # type: ignore[union-attr]
    assert "is also claimed by tenant-b/meter-0000" in message
    assert sorted(str(r.device) for r in instance.directory.routes()) == [
        "fleet/meter-0003",
        "tenant-b/meter-0004",
    ]


async def test_rotate_annotation_replaces_the_certificate(site: Site, instance: Standalone) -> None:
    site.standard(1)
    await instance.runner.run_until_settled(limit=30)
    ref = ObjectRef("fleet", "meter-0000")
    before = instance.store.get("Device", ref)
    assert before is not None
    doc = site.device(0)
    doc["metadata"]["annotations"] = {"cloudconnector.io/rotate": "2026-11-28"}
    site.write("devices.yaml", [doc])
    result = await instance.runner.run_until_settled(limit=30)
    assert not result.failed
    after = instance.store.get("Device", ref)
    assert after is not None
    assert after.status["phase"] == "Ready"
    assert after.status["certificateId"] != before.status["certificateId"]
    assert after.status["rotation"]["token"] == "2026-11-28"
    [thing] = site.things()
    assert len(site.certificates_of(thing)) == 1  # the old one is gone
    # Re-reading the same files does not rotate again.
    await instance.runner.run_until_settled(limit=30)
    again = instance.store.get("Device", ref)
    assert again is not None and again.status["certificateId"] == after.status["certificateId"]


async def test_removing_every_file_cleans_up_everything(site: Site, instance: Standalone) -> None:
    site.standard(2)
    await instance.runner.run_until_settled(limit=30)
    for path in site.manifests.iterdir():
        path.unlink()
    result = await instance.runner.run_until_settled(limit=30)
    assert not result.failed and not result.pending
    assert site.things() == []
    for kind in ("Device", "Group", "Endpoint"):
        assert instance.store.list(kind) == []


def test_endpoint_credentials_from_the_environment(site: Site, clean_env: dict[str, str]) -> None:
    endpoint = site.endpoint()[1]
    del endpoint["spec"]["aws"]["credentialsSecretRef"]
    site.write("endpoint.yaml", [endpoint, site.group("meters")])
    site.write("devices.yaml", [site.device(0)])
    env = {**clean_env, "AWS_ACCESS_KEY_ID": "from-env", "AWS_SECRET_ACCESS_KEY": "from-env"}
    done = run_cli(site, env, "run", "-f", str(site.manifests), "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert phases(site) == ["Ready"]
    assert "from-env" not in done.stdout + done.stderr
