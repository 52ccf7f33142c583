"""A process killed anywhere and restarted with the saved progress: no duplicates, no orphans.

Each crash is simulated by a checkpoint that raises at its k-th call, either after the record was
kept (died right after writing it) or before (died between the AWS call and its record, which
for k = the certificate's id record is the crash right after CreateKeysAndCertificate). The
restart is a new provisioner, as a new process would build.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cloudconnector.model import Device
from tests.aws.conftest import Crash, Recorder, iot_inventory, make_device

PROVISION_CHECKPOINTS = 5
ROTATION_CHECKPOINTS = 5
DEPROVISION_CHECKPOINTS = 3
LOSE = [pytest.param(False, id="kept"), pytest.param(True, id="lost")]


async def _assert_one_clean_identity(iot: Any, reader: Any, device: Device, ident: Any) -> None:
    assert iot.list_thing_principals(thingName=device.cloud_id)["principals"] == [ident.certificate_arn]
    desc = iot.describe_certificate(certificateId=ident.certificate_id)["certificateDescription"]
    assert desc["status"] == "ACTIVE"
    attached = iot.list_attached_policies(target=ident.certificate_arn)["policies"]
    assert [p["policyName"] for p in attached] == [ident.policy_name]
    assert (await reader.get(device.ref)).certificate_pem == desc["certificatePem"]


async def test_checkpoint_counts(make_provisioner: Any, keys: Any, namespace: str) -> None:
    """The parametrised crash points below cover every checkpoint of each operation."""
    prov = make_provisioner()
    device = make_device(namespace, 1)
    rec = Recorder()
    await prov.provision(device, {}, rec, keys)
    assert rec.calls == PROVISION_CHECKPOINTS
    rot = Recorder(saved=[rec.last])
    await prov.rotate(dataclasses.replace(device, rotate_token="1"), rec.last, rot, keys)
    assert rot.calls == ROTATION_CHECKPOINTS
    gone = Recorder()
    await prov.deprovision(device, rot.last, gone)
    assert gone.calls == DEPROVISION_CHECKPOINTS


@pytest.mark.parametrize("lose", LOSE)
@pytest.mark.parametrize("k", range(1, PROVISION_CHECKPOINTS + 1))
async def test_provision_resumes(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str, k: int, lose: bool
) -> None:
    # Crashes around CreateKeysAndCertificate make the restart sweep for orphans: another
    # device's finished identity must come through that untouched.
    sweeps = k in (3, 4)  # the requestedAt and the certificate id checkpoints
    if sweeps:
        bystander = make_device(namespace, 99)
        other = await make_provisioner().provision(bystander, {}, Recorder(), keys)
    device = make_device(namespace, 1)

    crashed = Recorder(crash_at=k, lose=lose)
    with pytest.raises(Crash):
        await make_provisioner().provision(device, {}, crashed, keys)
    ident = await make_provisioner().provision(device, crashed.last, Recorder(), keys)

    inv = iot_inventory(iot)
    assert inv["things"] == sorted([bystander.cloud_id, device.cloud_id] if sweeps else [device.cloud_id])
    expected = {ident.certificate_id: "ACTIVE"}
    if sweeps:
        expected[other.certificate_id] = "ACTIVE"
    assert inv["certs"] == expected
    assert len(inv["policies"]) == len(expected)
    await _assert_one_clean_identity(iot, reader, device, ident)
    if sweeps:
        await _assert_one_clean_identity(iot, reader, bystander, other)


@pytest.mark.parametrize("lose", LOSE)
@pytest.mark.parametrize("k", range(1, ROTATION_CHECKPOINTS + 1))
async def test_rotation_resumes(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str, k: int, lose: bool
) -> None:
    device = make_device(namespace, 1)
    start = Recorder()
    old = await make_provisioner().provision(device, {}, start, keys)
    rotating = dataclasses.replace(device, rotate_token="now")

    crashed = Recorder(crash_at=k, lose=lose, saved=[start.last])
    with pytest.raises(Crash):
        await make_provisioner().rotate(rotating, start.last, crashed, keys)
    new = await make_provisioner().rotate(rotating, crashed.last, Recorder(), keys)

    assert new.certificate_id != old.certificate_id
    inv = iot_inventory(iot)
    assert inv["certs"] == {new.certificate_id: "ACTIVE"}
    assert inv["things"] == [device.cloud_id] and inv["policies"] == [new.policy_name]
    await _assert_one_clean_identity(iot, reader, device, new)


@pytest.mark.parametrize("lose", LOSE)
@pytest.mark.parametrize("k", range(1, DEPROVISION_CHECKPOINTS + 1))
async def test_deprovision_resumes(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str, k: int, lose: bool
) -> None:
    device = make_device(namespace, 1)
    start = Recorder()
    await make_provisioner().provision(device, {}, start, keys)
    crashed = Recorder(crash_at=k, lose=lose, saved=[start.last])
    with pytest.raises(Crash):
        await make_provisioner().deprovision(device, start.last, crashed)
    await make_provisioner().deprovision(device, crashed.last, Recorder())
    assert iot_inventory(iot) == {"things": [], "certs": {}, "arns": {}, "policies": []}


async def test_sweep_spares_certificates_this_process_is_still_attaching(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    """Two devices on one provisioner: one resumes (and sweeps) while the other's new
    certificate exists but is not attached yet."""
    prov = make_provisioner()
    a, b = make_device(namespace, 1), make_device(namespace, 2)
    crashed = Recorder(crash_at=4, lose=True)  # a's certificate made, its id never recorded
    with pytest.raises(Crash):
        await prov.provision(a, {}, crashed, keys)

    paused = Recorder(crash_at=4)  # b's certificate made and recorded, nothing attached yet
    with pytest.raises(Crash):
        await prov.provision(b, {}, paused, keys)
    b_cert = paused.last["certificate"]["id"]

    await make_provisioner().provision(a, crashed.last, Recorder(), keys)  # a restarted process
    assert b_cert not in iot_inventory(iot)["certs"]  # another process cannot tell b's from an orphan

    # In the same process the sweep knows b's certificate is in flight and leaves it alone.
    crashed_again = Recorder(crash_at=4, lose=True)
    c = make_device(namespace, 3)
    with pytest.raises(Crash):
        await prov.provision(c, {}, crashed_again, keys)
    paused_d = Recorder(crash_at=4)
    d = make_device(namespace, 4)
    with pytest.raises(Crash):
        await prov.provision(d, {}, paused_d, keys)
    await prov.provision(c, crashed_again.last, Recorder(), keys)
    assert paused_d.last["certificate"]["id"] in iot_inventory(iot)["certs"]


@pytest.mark.parametrize("k", [3, 4, 5])
async def test_deprovision_after_a_crashed_provision(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str, k: int
) -> None:
    """The Device is deleted instead of resumed: even the unrecorded certificate goes."""
    device = make_device(namespace, 1)
    crashed = Recorder(crash_at=k, lose=True)
    with pytest.raises(Crash):
        await make_provisioner().provision(device, {}, crashed, keys)
    assert iot_inventory(iot)["things"] == [device.cloud_id]
    await make_provisioner().deprovision(device, crashed.last, Recorder())
    assert iot_inventory(iot) == {"things": [], "certs": {}, "arns": {}, "policies": []}
