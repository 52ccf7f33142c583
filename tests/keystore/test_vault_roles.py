"""The Vault key store against a real OpenBao: what each role can and cannot do."""

from __future__ import annotations

import asyncio
import base64

import pytest
import requests

from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore, transit_key_name
from cloudconnector.model import ObjectRef
from tests.keystore.conftest import Roles


def http(roles: Roles, method: str, path: str, token: str, body: dict | None = None) -> requests.Response:
    return requests.request(
        method, f"{roles.url}/v1/{path}", headers={"X-Vault-Token": token}, json=body, timeout=10
    )


def data_path(device: ObjectRef) -> str:
    return f"secret/data/cloud-connector/{device.namespace}/{device.name}"


def metadata_path(device: ObjectRef) -> str:
    return f"secret/metadata/cloud-connector/{device.namespace}/{device.name}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_operator_put_then_proxy_get_round_trips_exactly(
    operator: VaultKeyStore, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    info = await operator.put(device, material, {"thumbprint": "ab12", "certificateId": "c-1"})
    assert info.version == 1
    assert info.location == f"vault:secret/cloud-connector/{device.namespace}/{device.name}"
    assert await proxy.get(device) == material
    assert (await proxy.get(device)).private_key_pem == material.private_key_pem
    assert (await proxy.get(device)).password == material.password


async def test_round_trip_without_optional_parts(
    operator: VaultKeyStore, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    bare = KeyMaterial(certificate_pem=material.certificate_pem, private_key_pem=material.private_key_pem)
    await operator.put(device, bare, {})
    assert await proxy.get(device) == bare


async def test_the_record_holds_only_ciphertext(
    roles: Roles, operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {})
    record = http(roles, "GET", data_path(device), roles.root.token).json()["data"]["data"]
    assert record["transit_key"] == transit_key_name(device)
    assert record["private_key"].startswith("vault:v")
    assert record["password"].startswith("vault:v")
    assert material.password not in str(record)
    assert b"PRIVATE KEY" not in str(record).encode()


async def test_operator_cannot_read_the_secret_back(
    roles: Roles, operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {})
    answer = http(roles, "GET", data_path(device), roles.operator_token)
    assert answer.status_code == 403
    with pytest.raises(PermanentError) as err:
        await operator.get(device)
    assert err.value.reason == "VaultForbidden"
    assert f"GET {data_path(device)}" in str(err.value)


async def test_operator_cannot_decrypt(
    roles: Roles, operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {})
    record = http(roles, "GET", data_path(device), roles.root.token).json()["data"]["data"]
    key = transit_key_name(device)
    body = {"ciphertext": record["private_key"]}
    assert http(roles, "POST", f"transit/decrypt/{key}", roles.operator_token, body).status_code == 403
    # Nor by making the key exportable and exporting it.
    assert http(roles, "GET", f"transit/export/encryption-key/{key}", roles.operator_token).status_code == 403


async def test_proxy_cannot_write_or_delete(
    roles: Roles, operator: VaultKeyStore, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {"a": "1"})
    with pytest.raises(PermanentError) as err:
        await proxy.put(device, material, {})
    assert err.value.reason == "VaultForbidden"
    with pytest.raises(PermanentError) as err:
        await proxy.delete(device)
    assert err.value.reason == "VaultForbidden"
    assert http(roles, "DELETE", metadata_path(device), roles.proxy_token).status_code == 403
    assert http(roles, "GET", metadata_path(device), roles.proxy_token).status_code == 403
    key = transit_key_name(device)
    assert (
        http(roles, "POST", f"transit/encrypt/{key}", roles.proxy_token, {"plaintext": b64("x")}).status_code
        == 403
    )
    assert await proxy.get(device) == material  # nothing was changed


async def test_each_device_has_its_own_transit_key(
    roles: Roles, operator: VaultKeyStore, proxy: VaultKeyStore, material: KeyMaterial
) -> None:
    one, two = ObjectRef("keystore-tests", "own-key-1"), ObjectRef("keystore-tests", "own-key-2")
    await operator.put(one, material, {})
    await operator.put(two, material, {})
    assert transit_key_name(one) != transit_key_name(two)
    rec_one = http(roles, "GET", data_path(one), roles.root.token).json()["data"]["data"]
    rec_two = http(roles, "GET", data_path(two), roles.root.token).json()["data"]["data"]
    assert rec_one["private_key"] != rec_two["private_key"]
    # The proxy may decrypt, but one device's ciphertext does not open with the other's key,
    # even with the right associated data.
    ad_one = b64(f"cloud-connector/{one.namespace}/{one.name}/private_key")
    wrong = {"ciphertext": rec_one["private_key"], "associated_data": ad_one}
    answer = http(roles, "POST", f"transit/decrypt/{transit_key_name(two)}", roles.proxy_token, wrong)
    assert answer.status_code == 400
    right = http(roles, "POST", f"transit/decrypt/{transit_key_name(one)}", roles.proxy_token, wrong)
    assert right.status_code == 200


async def test_a_record_copied_into_another_slot_is_refused(
    roles: Roles, operator: VaultKeyStore, proxy: VaultKeyStore, material: KeyMaterial
) -> None:
    one, two = ObjectRef("keystore-tests", "swap-1"), ObjectRef("keystore-tests", "swap-2")
    await operator.put(one, material, {})
    await operator.put(two, material, {})
    rec_one = http(roles, "GET", data_path(one), roles.root.token).json()["data"]["data"]

    http(roles, "POST", data_path(two), roles.root.token, {"data": rec_one}).raise_for_status()
    with pytest.raises(PermanentError) as err:
        await proxy.get(two)
    assert err.value.reason == "VaultRecordInvalid"

    # Relabelled to the other key: the ciphertext still does not open there.
    forged = dict(rec_one, transit_key=transit_key_name(two))
    http(roles, "POST", data_path(two), roles.root.token, {"data": forged}).raise_for_status()
    with pytest.raises(PermanentError) as err:
        await proxy.get(two)
    assert err.value.reason == "VaultDecryptFailed"


async def test_describe_returns_the_metadata_and_version(
    operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    assert await operator.describe(device) is None
    await operator.put(device, material, {"thumbprint": "aa", "certificateId": "one"})
    first = await operator.describe(device)
    assert first is not None
    assert first.version == 1
    assert dict(first.metadata) == {"thumbprint": "aa", "certificateId": "one"}
    await operator.put(device, material, {"thumbprint": "bb"})
    second = await operator.describe(device)
    assert second is not None
    assert second.version == 2
    assert dict(second.metadata) == {"thumbprint": "bb"}
    assert second.location == first.location


async def test_delete_removes_metadata_versions_and_transit_key(
    roles: Roles, operator: VaultKeyStore, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {"x": "y"})
    await operator.put(device, material, {"x": "z"})
    key = transit_key_name(device)
    assert http(roles, "GET", f"transit/keys/{key}", roles.root.token).status_code == 200

    await operator.delete(device)
    assert await operator.describe(device) is None
    assert http(roles, "GET", metadata_path(device), roles.root.token).status_code == 404
    assert http(roles, "GET", f"{data_path(device)}?version=1", roles.root.token).status_code == 404
    assert http(roles, "GET", f"transit/keys/{key}", roles.root.token).status_code == 404
    with pytest.raises(KeyError):
        await proxy.get(device)

    await operator.delete(device)  # idempotent
    await operator.delete(ObjectRef("keystore-tests", "never-stored"))


async def test_get_of_a_missing_device_is_a_key_error(proxy: VaultKeyStore, device: ObjectRef) -> None:
    with pytest.raises(KeyError):
        await proxy.get(device)


async def test_put_after_delete_starts_afresh(
    operator: VaultKeyStore, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {})
    await operator.delete(device)
    info = await operator.put(device, material, {"again": "yes"})
    assert info.version == 1
    assert await proxy.get(device) == material


async def test_many_devices_at_once_share_one_session(
    operator: VaultKeyStore, proxy: VaultKeyStore, material: KeyMaterial
) -> None:
    devices = [ObjectRef("keystore-burst", f"dev-{i}") for i in range(40)]
    infos = await asyncio.gather(*(operator.put(d, material, {"i": d.name}) for d in devices))
    assert [i.metadata["i"] for i in infos] == [d.name for d in devices]
    fetched = await asyncio.gather(*(proxy.get(d) for d in devices))
    assert all(f == material for f in fetched)
    assert operator.session.logins == 1
    await asyncio.gather(*(operator.delete(d) for d in devices))
    assert not any(await asyncio.gather(*(operator.describe(d) for d in devices)))
