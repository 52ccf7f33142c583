"""Deprovisioning, rotation and manual provisioning on AWS IoT Core (moto over HTTP)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cloudconnector.clouds.aws_api import REQUIRED_IAM_ACTIONS, iam_policy_document
from cloudconnector.clouds.certs import self_signed
from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial
from tests.aws.conftest import Crash, Recorder, iot_inventory, make_device


async def test_deprovision_leaves_nothing(make_provisioner: Any, iot: Any, keys: Any, namespace: str) -> None:
    prov = make_provisioner()
    devices = [make_device(namespace, i) for i in range(3)]
    records = [Recorder() for _ in devices]
    for device, rec in zip(devices, records, strict=True):
        await prov.provision(device, {}, rec, keys)
    for device, rec in zip(devices, records, strict=True):
        done = Recorder()
        await prov.deprovision(device, rec.last, done)
        assert not any(done.last.values())  # every record cleared (set to None)
    assert iot_inventory(iot) == {"things": [], "certs": {}, "arns": {}, "policies": []}


async def test_deprovision_twice_is_harmless(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner()
    device = make_device(namespace, 1)
    rec = Recorder()
    await prov.provision(device, {}, rec, keys)
    full = rec.last
    await prov.deprovision(device, dict(full), Recorder())
    # The same (stale) progress again: every resource is already gone.
    await prov.deprovision(device, dict(full), Recorder())
    assert iot_inventory(iot)["things"] == []


async def test_deprovision_keeps_a_thing_that_existed_before(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    device = make_device(namespace, 1)
    iot.create_thing(thingName=device.cloud_id)
    prov = make_provisioner()
    rec = Recorder()
    await prov.provision(device, {}, rec, keys)
    assert rec.last["thingOwned"] is False
    await prov.deprovision(device, rec.last, Recorder())
    inv = iot_inventory(iot)
    assert inv["things"] == [device.cloud_id]
    assert inv["certs"] == {} and inv["policies"] == []


async def test_rotation_leaves_one_active_certificate(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str
) -> None:
    prov = make_provisioner()
    device = make_device(namespace, 1)
    rec = Recorder()
    old = await prov.provision(device, {}, rec, keys)
    rotating = dataclasses.replace(device, rotate_token="2026-11-28")
    new = await prov.rotate(rotating, rec.last, rec, keys)

    assert new.certificate_id != old.certificate_id
    assert new.cloud_id == old.cloud_id and new.policy_name == old.policy_name
    inv = iot_inventory(iot)
    assert inv["certs"] == {new.certificate_id: "ACTIVE"}  # the old one is deleted, not just inactive
    assert iot.list_thing_principals(thingName=device.cloud_id)["principals"] == [new.certificate_arn]
    assert [p["policyName"] for p in iot.list_attached_policies(target=new.certificate_arn)["policies"]] == [
        new.policy_name
    ]
    material = await reader.get(device.ref)
    assert (
        material.certificate_pem
        == (
            iot.describe_certificate(certificateId=new.certificate_id)["certificateDescription"][
                "certificatePem"
            ]
        )
    )

    # The same annotation value again does not rotate again; a new value does.
    again = await prov.rotate(rotating, rec.last, rec, keys)
    assert again == new
    third = await prov.rotate(dataclasses.replace(device, rotate_token="later"), rec.last, rec, keys)
    assert third.certificate_id not in (old.certificate_id, new.certificate_id)
    assert iot_inventory(iot)["certs"] == {third.certificate_id: "ACTIVE"}


async def test_adopt_registers_the_users_certificate(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str
) -> None:
    cert, key = self_signed("meter-0001")
    material = KeyMaterial(certificate_pem=cert, private_key_pem=key)
    device = make_device(namespace, 1)
    prov = make_provisioner()
    rec = Recorder()
    ident = await prov.adopt(device, material, {}, rec, keys)

    inv = iot_inventory(iot)
    assert inv["certs"] == {ident.certificate_id: "ACTIVE"}
    desc = iot.describe_certificate(certificateId=ident.certificate_id)["certificateDescription"]
    assert desc["certificatePem"] == cert
    assert iot.list_thing_principals(thingName=device.cloud_id)["principals"] == [ident.certificate_arn]
    assert (await reader.get(device.ref)).private_key_pem == key

    await prov.deprovision(device, rec.last, Recorder())
    assert iot_inventory(iot) == {"things": [], "certs": {}, "arns": {}, "policies": []}


async def test_adopt_without_registration_only_stores(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str
) -> None:
    cert, key = self_signed("meter-0002")
    device = make_device(namespace, 2, registerCertificate=False)
    ident = await make_provisioner().adopt(
        device, KeyMaterial(certificate_pem=cert, private_key_pem=key), {}, Recorder(), keys
    )
    assert iot_inventory(iot)["certs"] == {}
    assert ident.certificate_arn is None
    assert (await reader.get(device.ref)).certificate_pem == cert


async def test_adopt_of_an_already_registered_certificate_never_deletes_it(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    cert, key = self_signed("meter-0003")
    registered = iot.register_certificate_without_ca(certificatePem=cert, status="ACTIVE")
    device = make_device(namespace, 3)
    prov = make_provisioner()
    rec = Recorder()
    ident = await prov.adopt(device, KeyMaterial(certificate_pem=cert, private_key_pem=key), {}, rec, keys)
    assert ident.certificate_id == registered["certificateId"]
    await prov.deprovision(device, rec.last, Recorder())
    inv = iot_inventory(iot)
    assert inv["certs"] == {registered["certificateId"]: "ACTIVE"}
    assert inv["things"] == [] and inv["policies"] == []


async def test_documented_iam_actions_cover_every_call(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner()
    device = make_device(namespace, 1)
    rec = Recorder()
    await prov.check()
    await prov.provision(device, {}, rec, keys)
    await prov.rotate(dataclasses.replace(device, rotate_token="x"), rec.last, rec, keys)
    allow_all = make_provisioner(policy={"mode": "AllowAll"})  # replaces the policy document
    await allow_all.provision(device, rec.last | {"policyReady": None}, rec, keys)
    await prov.deprovision(device, rec.last, rec)
    cert, key = self_signed("meter-0009")
    other = make_device(namespace, 9)
    await prov.adopt(other, KeyMaterial(cert, key), {}, Recorder(), keys)
    used = prov._api.used | allow_all._api.used
    assert used <= set(REQUIRED_IAM_ACTIONS)
    assert {"iot:CreatePolicyVersion", "iot:RegisterCertificateWithoutCA", "iot:DeletePolicy"} <= used
    assert iam_policy_document()["Statement"][0]["Action"] == list(REQUIRED_IAM_ACTIONS)


async def test_adopt_resumed_with_other_material_registers_the_new_certificate(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str
) -> None:
    first_cert, first_key = self_signed("meter-0004")
    device = make_device(namespace, 4)
    crashed = Recorder(crash_at=4)  # registered and recorded, nothing attached or stored yet
    with pytest.raises(Crash):
        await make_provisioner().adopt(device, KeyMaterial(first_cert, first_key), {}, crashed, keys)
    assert len(iot_inventory(iot)["certs"]) == 1

    cert, key = self_signed("meter-0004")  # the user replaced the Secret meanwhile
    ident = await make_provisioner().adopt(device, KeyMaterial(cert, key), crashed.last, Recorder(), keys)
    desc = iot.describe_certificate(certificateId=ident.certificate_id)["certificateDescription"]
    assert desc["certificatePem"] == cert
    assert iot_inventory(iot)["certs"] == {ident.certificate_id: "ACTIVE"}
    assert (await reader.get(device.ref)).certificate_pem == cert


async def test_changing_the_cloud_id_of_a_provisioned_device_is_refused(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner()
    device = make_device(namespace, 5)
    rec = Recorder()
    await prov.provision(device, {}, rec, keys)
    renamed = dataclasses.replace(device, cloud_id="renamed-thing")
    with pytest.raises(PermanentError) as caught:
        await prov.provision(renamed, rec.last, Recorder(), keys)
    assert caught.value.reason == "CloudIdChanged"
    await prov.deprovision(renamed, rec.last, Recorder())  # the recorded thing is what goes
    assert iot_inventory(iot)["things"] == []


class _ActiveCheckingStore:
    """Wraps the real key store and records the cloud status of each certificate it is handed."""

    def __init__(self, inner: Any, iot: Any) -> None:
        self.inner, self.iot, self.seen = inner, iot, []

    async def put(self, device: Any, material: Any, metadata: Any) -> Any:
        cert_id = metadata["certificateId"]
        status = self.iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"]
        self.seen.append((cert_id, status))
        return await self.inner.put(device, material, metadata)

    async def describe(self, device: Any) -> Any:
        return await self.inner.describe(device)

    async def delete(self, device: Any) -> None:
        await self.inner.delete(device)


async def test_key_store_only_ever_receives_active_certificates(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    # The proxy reads whatever the key store holds: during a rotation it must never be handed a
    # certificate AWS does not accept yet.
    prov = make_provisioner()
    device = make_device(namespace, 1)
    store = _ActiveCheckingStore(keys, iot)
    rec = Recorder()
    await prov.provision(device, {}, rec, store)
    await prov.rotate(dataclasses.replace(device, rotate_token="r1"), rec.last, rec, store)
    assert len(store.seen) == 2
    assert all(status == "ACTIVE" for _, status in store.seen), store.seen
