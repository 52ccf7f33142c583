"""The reconcile core on its own (no Kubernetes): real moto and OpenBao, status kept in a dict."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cloudconnector.clouds.factory import make_provisioner
from cloudconnector.core import conditions as cond
from cloudconnector.core.conditions import Condition, set_condition, status_patch
from cloudconnector.core.conflicts import Peer, find_clashes
from cloudconnector.core.device import DeviceReconciler, WaitingError
from cloudconnector.core.group import count
from cloudconnector.core.provisioners import ProvisionerPool
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.model import Endpoint, ObjectRef, parse_device, parse_endpoint, parse_group
from tests.operator.conftest import FAKE_KEYS, Vault
from tests.support.procs import Moto


def test_transition_time_moves_only_when_status_flips() -> None:
    status: dict[str, Any] = {}
    set_condition(status, Condition("Ready", "False", "Waiting", "a"), 1)
    first = dict(status["conditions"][0])
    first_stamp = "2000-01-01T00:00:00Z"
    status["conditions"][0]["lastTransitionTime"] = first_stamp
    set_condition(status, Condition("Ready", "False", "StillWaiting", "b"), 2)
    again = status["conditions"][0]
    assert again["lastTransitionTime"] == first_stamp and again["reason"] == "StillWaiting"
    assert again["observedGeneration"] == 2 and first["observedGeneration"] == 1
    set_condition(status, Condition("Ready", "True", "Done", "c"), 2)
    assert status["conditions"][0]["lastTransitionTime"] != first_stamp
    assert len(status["conditions"]) == 1


def test_status_patch_deletes_dropped_nested_keys() -> None:
    old = {"phase": "Provisioning", "progress": {"thing": "t", "cert": {"id": "1"}}, "message": "m"}
    new = {"phase": "Ready", "progress": {"thing": "t"}}
    assert status_patch(old, new) == {"phase": "Ready", "progress": {"cert": None}, "message": None}
    assert status_patch(new, new) == {}


def _device(name: str, ip: str | None, iccid: str) -> Any:
    spec: dict[str, Any] = {"group": "g", "sim": {"iccid": iccid}}
    if ip:
        spec["ip"] = ip
    return parse_device({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def test_clashes_by_ip_and_iccid() -> None:
    me = _device("me", "10.0.0.1", "893530000000000001")
    peers = [
        Peer(ObjectRef("ns", "me"), "10.0.0.1", "893530000000000001"),
        Peer(ObjectRef("ns", "ip-twin"), "10.0.0.1", "893530000000000002"),
        Peer(ObjectRef("ns", "sim-twin"), "10.0.0.9", "893530000000000001"),
        Peer(ObjectRef("ns", "stranger"), "10.0.0.7", "893530000000000003"),
    ]
    clashes = {c.field: c.others for c in find_clashes(me, peers)}
    assert clashes == {"ip": (ObjectRef("ns", "ip-twin"),), "iccid": (ObjectRef("ns", "sim-twin"),)}
    assert find_clashes(me, [Peer(ObjectRef("ns", "me"), "10.0.0.1", "893530000000000001")]) == ()


def test_group_counts() -> None:
    phases = [{"phase": "Ready"}, {"phase": "Failed"}, {"phase": "Pending"}, None, {"phase": "Ready"}]
    assert count(phases) == {"total": 5, "provisioned": 2, "failed": 1, "pending": 2}


@pytest.fixture
def keys(vault: Vault) -> Iterator[VaultKeyStore]:
    store = VaultKeyStore(VaultConfig(address=vault.url, token=vault.operator_token))
    yield store
    store.close()


def _endpoint(moto: Moto) -> Endpoint:
    body = {
        "metadata": {"name": "aws", "namespace": "core", "uid": str(uuid.uuid4()), "generation": 1},
        "spec": {"type": "AwsIotCore", "aws": {"region": "eu-west-1", "endpointUrl": moto.url}},
    }
    return parse_endpoint(body)


async def test_core_provisions_and_finalizes_without_kubernetes(
    moto_server: Moto, keys: VaultKeyStore, aws: Any, vault: Vault
) -> None:
    endpoint = _endpoint(moto_server)

    async def credentials(_: Endpoint) -> dict[str, str]:
        return dict(FAKE_KEYS)

    pool = ProvisionerPool(make_provisioner, credentials)
    reconciler = DeviceReconciler(pool, keys, lambda ns, name: endpoint if name == "aws" else None)
    group = parse_group(
        {"metadata": {"name": "g", "namespace": "core"}, "spec": {"endpointRef": {"name": "aws"}}}
    )
    name = f"dev-{uuid.uuid4().hex[:6]}"
    device = parse_device(
        {
            "metadata": {"name": name, "namespace": "core", "generation": 3},
            "spec": {"group": "g", "sim": {"iccid": "893530000000000042"}},
        }
    )
    saved: list[dict[str, Any]] = []

    async def save(status: dict[str, Any]) -> None:
        saved.append(status)

    # The Endpoint is not Ready yet: the device waits, nothing is created.
    with pytest.raises(WaitingError):
        await reconciler.reconcile(device, group, endpoint, {}, save, endpoint_ready=False)
    assert saved[-1]["phase"] == "Pending" and aws().list_things()["things"] == []

    status = await reconciler.reconcile(device, group, endpoint, saved[-1], save)
    assert status["phase"] == "Ready" and status["observedGeneration"] == 3
    assert cond.is_true(status, cond.READY)
    # Checkpoints were stored while working, before the final status.
    assert any(s.get("phase") == "Provisioning" and s.get("progress") for s in saved[:-1])
    assert vault.secret_paths("core").count(name) == 1

    # Once provisioned, an Endpoint that is not Ready (keys revoked) does not un-ready the device.
    again = await reconciler.reconcile(device, group, endpoint, status, save, endpoint_ready=False)
    assert again["phase"] == "Ready" and again["certificateId"] == status["certificateId"]

    await reconciler.finalize(device, again, save)
    assert aws().list_things()["things"] == [] and aws().list_certificates()["certificates"] == []
    assert name not in vault.secret_paths("core")
    await pool.aclose()
