"""Devices provisioned end to end: kopf over kmock, AWS on moto, keys in OpenBao."""

from __future__ import annotations

from typing import Any

from tests.operator.conftest import DEVICES, ENDPOINTS, GROUPS, Cluster, Fleet, OperatorProcess, Vault


async def test_devices_become_ready(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    await fleet.endpoint("aws-prod")
    await fleet.group("meters", "aws-prod")
    names = [f"meter-{i:02d}" for i in range(5)]
    for name in names:
        await fleet.device(name, "meters")

    for name in names:
        obj = await cluster.wait_phase(DEVICES, name, "Ready")
        status = obj["status"]
        assert status["endpoint"] == "aws-prod"
        assert status["cloudId"] == f"{cluster.namespace}_{name}"
        assert status["certificateId"] and status["certificateArn"].startswith("arn:aws:iot:")
        assert status["keyLocation"] and status["notAfter"]
        assert status["observedGeneration"] == 1
        ready = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert ready[0]["status"] == "True" and obj["spec"]["sim"]["iccid"] in ready[0]["message"]
        assert api_finalizer(obj)

    iot = aws()
    things = {t["thingName"] for t in iot.list_things()["things"]}
    assert things == {f"{cluster.namespace}_{n}" for n in names}
    certs = iot.list_certificates()["certificates"]
    assert len(certs) == len(names) and all(c["status"] == "ACTIVE" for c in certs)
    assert vault.secret_paths(cluster.namespace) == sorted(names)

    endpoint = await cluster.wait_phase(ENDPOINTS, "aws-prod", "Ready")
    assert endpoint["status"]["host"]
    group = await cluster.wait_for(
        GROUPS, "meters", lambda o: (o or {}).get("status", {}).get("provisioned") == 5
    )
    assert group is not None and group["status"]["total"] == 5 and group["status"]["pending"] == 0
    events = await cluster.wait_events(names[0], {"Provisioning", "Provisioned"})
    assert all(e["involvedObject"]["kind"] == "Device" for e in events)


def api_finalizer(obj: dict[str, Any]) -> bool:
    return "cloudconnector.io/cloud-identity" in (obj["metadata"].get("finalizers") or [])
