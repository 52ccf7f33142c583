"""The proxy reading credentials from OpenBao with its read-only role (the real key store)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.proxy.server import Proxy
from tests.proxy.conftest import Client, Pki, World, proxy_config


async def test_device_connects_with_credentials_from_vault(
    pki: Pki,
    world: World,
    admin: Client,
    stores: tuple[VaultKeyStore, VaultKeyStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    writer, reader = stores
    route = world.add()
    material: KeyMaterial = world.keys.items[route.device]
    await writer.put(route.device, material, {"certificateId": route.certificate_id})
    proxy = Proxy(proxy_config(pki), world.directory, reader)
    async with proxy:
        admin.subscribe(f"{route.client_id}/#", 1)
        dev = Client("d", bind=route.ip or "")
        try:
            assert await asyncio.to_thread(dev.connect, proxy.ports["mqtt"]) == 0
            await asyncio.to_thread(dev.publish, f"{route.client_id}/up", b"via vault", 1)
            got = await asyncio.to_thread(admin.expect)
            assert got.payload == b"via vault"
        finally:
            await asyncio.to_thread(dev.close)
    assert proxy.metrics.key_fetch._sum.get() > 0  # the Vault read was timed
    key_text = material.private_key_pem.decode()
    assert "PRIVATE KEY" not in caplog.text and key_text not in caplog.text
