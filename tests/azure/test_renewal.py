"""Automatic renewal through the shared reconcile core: registry double over HTTPS, keys in OpenBao."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cloudconnector.clouds.factory import make_provisioner
from cloudconnector.core import conditions as cond
from cloudconnector.core.device import DeviceReconciler, renewal_due
from cloudconnector.core.provisioners import ProvisionerPool
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.model import Endpoint, parse_group
from tests.azure.conftest import azure_endpoint, new_device
from tests.azure.hub_double import HubDouble
from tests.support.pki import CA


def test_renewal_due_reads_the_recorded_time() -> None:
    now = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    assert not renewal_due({}, now)
    assert not renewal_due({"progress": {"renewAfter": "not a time"}}, now)
    assert not renewal_due({"progress": {"renewAfter": "2026-11-29T00:00:00Z"}}, now)
    assert renewal_due({"progress": {"renewAfter": "2026-11-27T23:59:59Z"}}, now)


async def test_core_renews_a_certificate_past_its_renewal_time(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, key_reader: VaultKeyStore
) -> None:
    endpoint = azure_endpoint(hub, azure_ca.cert_pem, certificateValidityDays=3)

    async def credentials(_: Endpoint) -> dict[str, str]:
        return {"connectionString": hub.connection_string()}

    pool = ProvisionerPool(make_provisioner, credentials)
    reconciler = DeviceReconciler(pool, keys, lambda ns, name: endpoint)
    group = parse_group(
        {"metadata": {"name": "g", "namespace": "azure-tests"}, "spec": {"endpointRef": {"name": "hub"}}}
    )
    device = new_device()
    saved: list[dict[str, Any]] = []

    async def save(status: dict[str, Any]) -> None:
        saved.append(status)

    try:
        first = await reconciler.reconcile(device, group, endpoint, {}, save)
        assert first["phase"] == "Ready"
        renew_at = dt.datetime.fromisoformat(first["progress"]["renewAfter"].replace("Z", "+00:00"))
        # Two thirds of three days, counted from the certificate's start (five minutes back-dated).
        assert dt.timedelta(hours=47) < renew_at - dt.datetime.now(dt.UTC) < dt.timedelta(hours=48)

        # Not due yet: reconciling again changes nothing.
        same = await reconciler.reconcile(device, group, endpoint, first, save)
        assert same["thumbprint"] == first["thumbprint"]

        # Time has passed (as the stored status would say two days later): the core renews.
        aged = {**first, "progress": {**first["progress"], "renewAfter": "2000-01-01T00:00:00Z"}}
        renewed = await reconciler.reconcile(device, group, endpoint, aged, save)
        assert renewed["phase"] == "Ready"
        assert renewed["thumbprint"] != first["thumbprint"]
        assert not cond.is_true(renewed, cond.ROTATING)
        assert hub.thumbprints(device.cloud_id) == (renewed["thumbprint"], renewed["thumbprint"])
        assert any(cond.is_true(s, cond.ROTATING) for s in saved)  # visible while it happened
        material = await key_reader.get(device.ref)
        assert material.certificate_pem != ""
        assert not renewal_due(renewed)
        await reconciler.finalize(device, renewed, save)
    finally:
        await pool.aclose()
