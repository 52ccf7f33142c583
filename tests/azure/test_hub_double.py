"""The registry double answers like IoT Hub: SAS checks, etags, thumbprint rules (so passing
provisioner tests mean something)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import time
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from cloudconnector.clouds.azure_credentials import parse_connection_string
from cloudconnector.clouds.azure_registry import DeviceExists, EtagMismatch, Registry
from cloudconnector.errors import PermanentError
from tests.azure.conftest import HUB_HOST
from tests.azure.hub_double import HubDouble
from tests.support.pki import CA

SHA1 = "a" * 40
SHA256 = "b" * 64


def sas(key: str, resource: str, expiry: int, policy: str = "registryReadWrite") -> str:
    sr = quote_plus(resource)
    digest = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={quote(base64.b64encode(digest))}&se={expiry}&skn={policy}"


async def raw_get(hub: HubDouble, ca: CA, token: str, path: str = "/devices/x?api-version=2021-04-12") -> int:
    tls = ssl.create_default_context(cadata=ca.cert_pem)
    async with (
        aiohttp.ClientSession() as s,
        s.get(hub.url + path, headers={"Authorization": token}, ssl=tls) as r,
    ):
        return r.status


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("good", 404),  # authorized; the device just does not exist
        ("expired", 401),
        ("other-hub", 401),
        ("wrong-key", 401),
        ("unknown-policy", 401),
        ("no-api-version", 400),
    ],
)
async def test_sas_checks(hub: HubDouble, azure_ca: CA, case: str, status: int) -> None:
    key = hub.policies["registryReadWrite"].key
    future = int(time.time()) + 600
    token = {
        "good": sas(key, HUB_HOST, future),
        "expired": sas(key, HUB_HOST, int(time.time()) - 1),
        "other-hub": sas(key, "other.azure-devices.net", future),
        "wrong-key": sas(base64.b64encode(b"k" * 32).decode(), HUB_HOST, future),
        "unknown-policy": sas(key, HUB_HOST, future, policy="nobody"),
        "no-api-version": sas(key, HUB_HOST, future),
    }[case]
    path = "/devices/x" if case == "no-api-version" else "/devices/x?api-version=2021-04-12"
    assert await raw_get(hub, azure_ca, token, path) == status


async def test_etags_conflicts_and_thumbprints(hub: HubDouble, azure_ca: CA) -> None:
    reg = Registry(
        parse_connection_string(hub.connection_string()), base_url=hub.url, ca_pem=azure_ca.cert_pem
    )
    try:
        made = await reg.create("d1", SHA1, SHA1)
        with pytest.raises(DeviceExists):
            await reg.create("d1", SHA1, SHA1)
        with pytest.raises(EtagMismatch):
            await reg.update("d1", "bm90LXRoZS1ldGFn", SHA1, SHA1)
        updated = await reg.update("d1", made.etag, SHA256, SHA256)
        assert updated.etag != made.etag and updated.primary == SHA256
        with pytest.raises(PermanentError, match="400"):
            await reg.update("d1", updated.etag, SHA1, SHA256)  # lengths differ
        with pytest.raises(PermanentError, match="400"):
            await reg.create("d2", "xyz", "xyz")
        assert await reg.delete("d1", updated.etag)
        assert not await reg.delete("d1")
        assert await reg.get("d1") is None
    finally:
        await reg.aclose()
