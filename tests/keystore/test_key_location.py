"""The proxy reads a device's credentials where the operator recorded them (``status.keyLocation``),
not where its own settings would put them, and a location that is not that device's slot is refused
before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.embedded import EmbeddedKeyStore
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.model import EndpointType, ObjectRef
from cloudconnector.proxy.credentials import read_credentials
from cloudconnector.routes import Route
from tests.keystore.conftest import Roles


def route(device: ObjectRef, key_location: str | None) -> Route:
    return Route(
        device,
        "893530000000000001",
        None,
        None,
        EndpointType.AWS,
        "h",
        8883,
        None,
        "t",
        "c1",
        key_location=key_location,
    )


async def test_vault_reads_at_the_recorded_location(
    roles: Roles, proxy: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    # The operator of another site keeps its records under its own prefix; this proxy's settings
    # name only the default one.
    writer = VaultKeyStore(
        VaultConfig(address=roles.url, token=roles.operator_token, prefix="cloud-connector/site-2")
    )
    try:
        stored = await writer.put(device, material, {"thumbprint": "t"})
        other = ObjectRef(device.namespace, device.name + "-other")
        await writer.put(other, material, {"thumbprint": "o"})
    finally:
        writer.close()
    assert stored.location == f"vault:secret/cloud-connector/site-2/{device.namespace}/{device.name}"

    with pytest.raises(KeyError):
        await read_credentials(proxy, route(device, None))  # nothing at the proxy's own slot
    got = await read_credentials(proxy, route(device, stored.location))
    assert got.certificate_pem == material.certificate_pem
    assert got.private_key_pem == material.private_key_pem

    # A status naming another device's record, another store, or a path outside any slot.
    refused = [
        f"vault:secret/cloud-connector/site-2/{other.namespace}/{other.name}",
        f"embedded:{device.namespace}/{device.name}",
        f"vault:secret/cloud-connector/../sys/{device.namespace}/{device.name}",
        f"vault:/{device.namespace}/{device.name}",
        "vault:secret",
    ]
    for location in refused:
        with pytest.raises(PermanentError, match="key location") as caught:
            await proxy.get(device, location)
        assert caught.value.reason == "KeyLocationInvalid"


async def test_embedded_reads_only_its_own_slot(tmp_path: Path, material: KeyMaterial) -> None:
    store = EmbeddedKeyStore.open(tmp_path / "keys.db", key_file=tmp_path / "master.key", env={})
    device = ObjectRef("fleet", "meter-1")
    stored = await store.put(device, material, {})
    reader = store.reader()
    got = await read_credentials(reader, route(device, stored.location))
    assert got.private_key_pem == material.private_key_pem
    assert (await reader.get(device)).certificate_pem == material.certificate_pem
    with pytest.raises(PermanentError, match="key location"):
        await reader.get(device, "embedded:fleet/meter-2")
    with pytest.raises(PermanentError, match="key location"):
        await reader.get(device, "vault:secret/cloud-connector/fleet/meter-1")
