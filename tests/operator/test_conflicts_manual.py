"""Duplicate SIM/IP claims, manual credentials, and IAM hygiene (revocable, then revoked keys)."""

from __future__ import annotations

from typing import Any

from cloudconnector.kube import SECRETS
from tests.operator.conftest import DEVICES, ENDPOINTS, Cluster, Fleet, OperatorProcess, Vault
from tests.support.pki import CA


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == ctype:
            return dict(cond)
    return None


async def test_duplicate_ip_blocks_both_and_clears(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("first", "g", ip="10.9.9.9")
    await fleet.device("second", "g", ip="10.9.9.9")

    for name, other in (("first", "second"), ("second", "first")):
        obj = await cluster.wait_phase(DEVICES, name, "Conflict")
        cond = condition(obj, "Conflict")
        assert cond is not None and cond["reason"] == "DuplicateIp" and other in cond["message"]
        assert not obj["status"].get("certificateId")
    assert aws().list_things()["things"] == []

    await cluster.delete(DEVICES, "second")
    await cluster.wait_gone(DEVICES, "second")
    ready = await cluster.wait_phase(DEVICES, "first", "Ready")
    assert condition(ready, "Conflict") is None
    assert [t["thingName"] for t in aws().list_things()["things"]] == [f"{cluster.namespace}_first"]


async def test_duplicate_iccid_keeps_the_existing_identity(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    old = await fleet.device("old", "g")
    before = (await cluster.wait_phase(DEVICES, "old", "Ready"))["status"]
    await fleet.device("copycat", "g", sim=old["spec"]["sim"])

    held = await cluster.wait_phase(DEVICES, "old", "Conflict")
    assert held["status"]["certificateId"] == before["certificateId"]  # kept, but not routed
    newcomer = await cluster.wait_phase(DEVICES, "copycat", "Conflict")
    assert condition(newcomer, "Conflict")["reason"] == "DuplicateIccid"  # type: ignore[index]
    assert [t["thingName"] for t in aws().list_things()["things"]] == [f"{cluster.namespace}_old"]

    await cluster.delete(DEVICES, "copycat")
    back = await cluster.wait_phase(DEVICES, "old", "Ready")
    assert back["status"]["certificateId"] == before["certificateId"]
    assert len(aws().list_certificates()["certificates"]) == 1


async def test_manual_credentials_are_adopted(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    issued = CA().issue("manual-device", client=True)
    await cluster.secret("own-cert", {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem})
    weak = CA().issue("weak-device", client=True, rsa_bits=1024)
    await cluster.secret("weak-cert", {"tls.crt": weak.cert_pem, "tls.key": weak.key_pem})
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("manual", "g", credentialsSecretRef={"name": "own-cert"})
    await fleet.device("weak", "g", credentialsSecretRef={"name": "weak-cert"})

    obj = await cluster.wait_phase(DEVICES, "manual", "Ready")
    assert "delete Secret" in obj["status"]["manualSecret"]
    await cluster.wait_events("manual", {"Adopted", "DeleteSecret"})
    certs = aws().list_certificates()["certificates"]
    assert [c["certificateId"] for c in certs] == [obj["status"]["certificateId"]]
    assert vault.secret_paths(cluster.namespace) == ["manual"]

    failed = await cluster.wait_phase(DEVICES, "weak", "Failed")
    assert condition(failed, "Ready")["reason"] == "WeakKey"  # type: ignore[index]
    assert "PRIVATE KEY" not in str(failed)


async def test_keys_revocable_then_revoked(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("a", "g")
    await cluster.wait_phase(DEVICES, "a", "Ready")
    endpoint = await cluster.wait_for(
        ENDPOINTS, "aws", lambda o: (condition(o, "CredentialsRevocable") or {}).get("status") == "True"
    )
    assert "aws-keys" in condition(endpoint, "CredentialsRevocable")["message"]  # type: ignore[index]

    # The platform engineer revokes the keys (here: removes the Secret).
    await cluster.client.request("DELETE", SECRETS.path(cluster.namespace, "aws-keys"))
    revoked = await cluster.wait_phase(ENDPOINTS, "aws", "Error")
    assert revoked["status"]["host"]  # kept for the proxy: provisioned devices keep working
    await fleet.device("late", "g")
    late = await cluster.wait_phase(DEVICES, "late", "Pending")
    assert condition(late, "Ready")["reason"] == "EndpointNotReady"  # type: ignore[index]
    assert (await cluster.get(DEVICES, "a") or {})["status"]["phase"] == "Ready"
    assert operator.proc is not None and operator.proc.poll() is None  # no crash loop
