"""The standalone mode over the operator's scenarios: provision, status, delete, move, bad input."""

from __future__ import annotations

import asyncio

import yaml

from cloudconnector.cli import main
from cloudconnector.model import ObjectRef
from cloudconnector.standalone.app import Standalone
from tests.standalone.conftest import Site


def ready(sa: Standalone) -> list[str]:
    return sorted(o.ref.name for o in sa.store.list("Device") if o.status.get("phase") == "Ready")


async def test_provision_then_status_table(site: Site, instance: Standalone, capsys) -> None:
    site.standard(3)
    result = await instance.runner.run_until_settled(limit=60)
    assert not result.errors and not result.failed and not result.pending
    assert ready(instance) == ["meter-0000", "meter-0001", "meter-0002"]
    assert site.things() == [f"{site.prefix}fleet_meter-000{i}" for i in range(3)]
    for thing in site.things():
        assert len(site.certificates_of(thing)) == 1
    for i in range(3):
        info = await instance.keys.writer.describe(ObjectRef("fleet", f"meter-000{i}"))
        assert info is not None
    endpoint = instance.store.list("Endpoint")[0].status
    assert endpoint["phase"] == "Ready" and endpoint["host"] == "127.0.0.1"
    revocable = next(c for c in endpoint["conditions"] if c["type"] == "CredentialsRevocable")
    assert revocable["status"] == "True"  # all devices provisioned: the IAM keys may go now
    group = instance.store.list("Group")[0].status
    assert (group["total"], group["provisioned"], group["failed"], group["pending"]) == (3, 3, 0, 0)
    # Routes for the in-process proxy are published from the same pass.
    assert sorted(r.ip for r in instance.directory.routes()) == ["10.64.0.1", "10.64.0.2", "10.64.0.3"]

    assert main(["status", "--state", str(site.state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["NAME", "PHASE", "GROUP", "ENDPOINT", "CLOUD", "ID", "CONNECTED", "LAST", "SEEN", "AGE"]
    assert lines[0].split() == header
    assert lines[1].split()[:5] == ["meter-0000", "Ready", "meters", "aws", f"{site.prefix}fleet_meter-0000"]
    assert len(lines) == 4
    assert main(["status", "-n", "elsewhere", "--state", str(site.state)]) == 0
    assert capsys.readouterr().out.strip() == "No devices found."
    assert main(["status", "all", "--state", str(site.state)]) == 0
    out = capsys.readouterr().out
    assert "AwsIotCore" in out and "PROVISIONED" in out
    # Neither the state database nor the CLI's output holds key material.
    for path in site.state.glob("state.db*"):
        assert b"PRIVATE KEY" not in path.read_bytes()
    assert "PRIVATE KEY" not in out


async def test_removed_device_is_deprovisioned(site: Site, instance: Standalone) -> None:
    site.standard(3)
    await instance.runner.run_until_settled(limit=60)
    gone = f"{site.prefix}fleet_meter-0001"
    assert gone in site.things()
    site.write("devices.yaml", [site.device(0), site.device(2)])
    result = await instance.runner.run_until_settled(limit=60)
    assert not result.failed and not result.pending
    assert gone not in site.things()
    assert len(site.things()) == 2
    assert [o.ref.name for o in instance.store.list("Device")] == ["meter-0000", "meter-0002"]
    assert await instance.keys.writer.describe(ObjectRef("fleet", "meter-0001")) is None
    # A deleted file removes what it held, too.
    (site.manifests / "devices.yaml").unlink()
    await instance.runner.run_until_settled(limit=60)
    assert site.things() == []
    assert instance.store.list("Device") == []


async def test_group_move_migrates_between_endpoints(site: Site, instance: Standalone) -> None:
    other = site.prefix.replace("-", "b-")
    site.write(
        "endpoints.yaml",
        [
            *site.endpoint("aws"),
            *site.endpoint("aws-b", prefix=other),
            site.group("meters"),
            site.group("b", "aws-b"),
        ],
    )
    site.write("devices.yaml", [site.device(0), site.device(1)])
    await instance.runner.run_until_settled(limit=60)
    assert len(site.things()) == 2
    site.write("devices.yaml", [site.device(0), site.device(1, group="b")])
    result = await instance.runner.run_until_settled(limit=60)
    assert not result.failed and not result.pending
    assert site.things() == [f"{site.prefix}fleet_meter-0000"]
    assert site.things(other) == [f"{other}fleet_meter-0001"]
    moved = instance.store.get("Device", ObjectRef("fleet", "meter-0001"))
    assert moved is not None
    assert moved.status["phase"] == "Ready" and moved.status["endpoint"] == "aws-b"
    route = next(r for r in instance.directory.routes() if r.device.name == "meter-0001")
    assert route.client_id == f"{other}fleet_meter-0001"


async def test_bad_manifests_name_file_and_field_and_keep_devices(site: Site, instance: Standalone) -> None:
    site.standard(2)
    bad = site.device(7)
    bad["spec"]["sim"]["iccid"] = "12ab"
    site.write("more.yaml", [site.device(5), bad])
    result = await instance.runner.run_until_settled(limit=60)
    messages = [str(e) for e in result.errors]
    assert any(m.startswith("more.yaml:") and "spec.sim.iccid" in m and "meter-0007" in m for m in messages)
    # The bad file is skipped whole; the good ones are applied.
    assert ready(instance) == ["meter-0000", "meter-0001"]

    # A file that no longer parses says nothing about removals: its devices stay provisioned.
    (site.manifests / "devices.yaml").write_text("kind: Device\n  metadata: [unclosed\n")
    result = await instance.runner.run_until_settled(limit=60)
    messages = [str(e) for e in result.errors]
    assert any(m.startswith("devices.yaml:") and "line" in m for m in messages)
    assert ready(instance) == ["meter-0000", "meter-0001"]
    assert len(site.things()) == 2

    # An unknown field is refused like kubectl would, naming the field.
    doc = site.device(0)
    doc["spec"]["colour"] = "red"
    (site.manifests / "devices.yaml").write_text(yaml.safe_dump_all([doc, site.device(1)]))
    result = await instance.runner.run_until_settled(limit=60)
    assert any("devices.yaml" in str(e) and "spec.colour" in str(e) for e in result.errors)
    assert ready(instance) == ["meter-0000", "meter-0001"]


async def test_watch_applies_edits(site: Site, instance: Standalone) -> None:
    site.standard(1)
    watcher = asyncio.create_task(instance.runner.watch(interval=0.1))
    try:

        async def until(names: list[str]) -> None:
            while ready(instance) != names:  # noqa: ASYNC110 - polling the store is the point
                await asyncio.sleep(0.1)

        await asyncio.wait_for(until(["meter-0000"]), 30)
        site.write("devices.yaml", [site.device(0), site.device(1)])
        await asyncio.wait_for(until(["meter-0000", "meter-0001"]), 30)
    finally:
        watcher.cancel()
    assert len(site.things()) == 2


async def test_moving_an_endpoint_to_another_region_is_refused(site: Site, instance: Standalone) -> None:
    # The identities live in eu-west-1: editing the region in place would strand them there.
    site.standard(1)
    await instance.runner.run_until_settled(limit=60)
    secret, endpoint = site.endpoint()
    endpoint["spec"]["aws"]["region"] = "us-east-1"
    site.write("endpoint.yaml", [secret, endpoint, site.group("meters")])
    result = await instance.runner.run_until_settled(limit=60)
    messages = [str(e) for e in result.errors]
    refused = [m for m in messages if m.startswith("endpoint.yaml:") and "spec.aws.region" in m]
    assert refused and "immutable" in refused[0]
    stored = instance.store.get("Endpoint", ObjectRef(site.namespace, "aws"))
    assert stored is not None and stored.body["spec"]["aws"]["region"] == "eu-west-1"
    assert ready(instance) == ["meter-0000"] and len(site.things()) == 1
