"""Deletion, rotation and migration of provisioned devices."""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import DEVICES, GROUPS, Cluster, Fleet, OperatorProcess, Vault


def aws_inventory(iot: Any) -> tuple[set[str], list[dict[str, Any]], set[str]]:
    things = {t["thingName"] for t in iot.list_things()["things"]}
    certs = iot.list_certificates()["certificates"]
    policies = {p["policyName"] for p in iot.list_policies()["policies"]}
    return things, certs, policies


async def test_deletion_leaves_nothing_behind(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("keep", "g")
    await fleet.device("drop", "g")
    await cluster.wait_phase(DEVICES, "keep", "Ready")
    await cluster.wait_phase(DEVICES, "drop", "Ready")

    await cluster.delete(DEVICES, "drop")
    await cluster.wait_gone(DEVICES, "drop")

    things, certs, policies = aws_inventory(aws())
    keep = f"{cluster.namespace}_keep"
    assert things == {keep}
    assert len(certs) == 1
    assert policies == {f"{keep}-policy"}
    assert vault.secret_paths(cluster.namespace) == ["keep"]
    await cluster.wait_events("drop", {"Deprovisioned"})

    await cluster.delete(DEVICES, "keep")
    await cluster.wait_gone(DEVICES, "keep")
    assert aws_inventory(aws()) == (set(), [], set())
    assert vault.secret_paths(cluster.namespace) == []


async def test_rotation_replaces_the_certificate(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("d", "g")
    before = (await cluster.wait_phase(DEVICES, "d", "Ready"))["status"]

    await cluster.patch(DEVICES, "d", {"metadata": {"annotations": {"cloudconnector.io/rotate": "2026-01"}}})
    after = await cluster.wait_for(
        DEVICES, "d", lambda o: (o or {}).get("status", {}).get("rotation", {}).get("token") == "2026-01"
    )
    assert after is not None
    status = after["status"]
    assert status["phase"] == "Ready"
    assert status["certificateId"] != before["certificateId"]
    assert status["cloudId"] == before["cloudId"]
    certs = aws().list_certificates()["certificates"]
    assert [c["certificateId"] for c in certs] == [status["certificateId"]]  # the old one is gone
    await cluster.wait_events("d", {"Rotating", "Rotated"})


async def test_migration_between_endpoints(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("west", region="eu-west-1")
    await fleet.endpoint("central", region="eu-central-1")
    await fleet.group("wg", "west")
    await fleet.group("cg", "central")
    await fleet.device("mover", "wg")
    await fleet.device("by-group", "wg")
    await cluster.wait_phase(DEVICES, "mover", "Ready")
    await cluster.wait_phase(DEVICES, "by-group", "Ready")

    # 1. A device moves to a group on another Endpoint.
    await cluster.patch(DEVICES, "mover", {"spec": {"group": "cg"}})
    moved = await cluster.wait_for(
        DEVICES,
        "mover",
        lambda o: (
            (o or {}).get("status", {}).get("endpoint") == "central" and o["status"].get("phase") == "Ready"
        ),
    )
    assert moved is not None
    west, central = aws("eu-west-1"), aws("eu-central-1")
    mover = f"{cluster.namespace}_mover"
    assert mover in aws_inventory(central)[0]
    assert mover not in aws_inventory(west)[0]
    assert f"{mover}-policy" not in aws_inventory(west)[2]

    # 2. A Group is pointed at another Endpoint: its devices follow.
    await cluster.patch(GROUPS, "wg", {"spec": {"endpointRef": {"name": "central"}}})
    await cluster.wait_for(
        DEVICES,
        "by-group",
        lambda o: (
            (o or {}).get("status", {}).get("endpoint") == "central" and o["status"].get("phase") == "Ready"
        ),
    )
    assert aws_inventory(west) == (set(), [], set())
    things, certs, _ = aws_inventory(central)
    assert things == {mover, f"{cluster.namespace}_by-group"}
    assert len(certs) == 2 and all(c["status"] == "ACTIVE" for c in certs)
