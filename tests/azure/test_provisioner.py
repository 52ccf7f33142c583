"""AzureIotHubProvisioner through its registry REST client, over HTTPS, against the registry double."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from cloudconnector.clouds.azure import AzureIotHubProvisioner, renew_after
from cloudconnector.clouds.base import Progress
from cloudconnector.clouds.certs import cert_info, self_signed, verify_self_signed
from cloudconnector.errors import CredentialsError, PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.ratelimit import RateLimiter
from tests.azure.conftest import HUB_HOST, azure_endpoint, new_device
from tests.azure.hub_double import HubDouble, new_key
from tests.support.pki import CA


class Recorder:
    """Keeps every checkpointed progress, as the operator would persist it in status."""

    def __init__(self) -> None:
        self.saved: list[Progress] = []

    async def __call__(self, progress: Progress) -> None:
        self.saved.append(dict(progress))


def _provisioner(hub: HubDouble, ca: CA, creds: dict[str, str] | None = None, **azure: Any):  # type: ignore[no-untyped-def]
    endpoint = azure_endpoint(hub, ca.cert_pem, **azure)
    creds = creds if creds is not None else {"connectionString": hub.connection_string()}
    return AzureIotHubProvisioner(endpoint, creds, RateLimiter(1000, burst=100))


async def test_check_resolves_the_hub(hub: HubDouble, azure_ca: CA) -> None:
    prov = _provisioner(hub, azure_ca)
    try:
        info = await prov.check()
    finally:
        await prov.aclose()
    assert (info.host, info.port) == (HUB_HOST, 8883)
    assert hub.calls[-1].status == 404  # the probe device does not exist, and that is fine


@pytest.mark.parametrize(
    "creds",
    [
        pytest.param("wrong-key", id="bad-sas-key"),
        pytest.param("unknown-policy", id="unknown-policy"),
        pytest.param("read-only", id="no-write-right"),
    ],
)
async def test_bad_credentials(hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, creds: str) -> None:
    if creds == "wrong-key":
        cs = hub.connection_string(key=new_key())
    elif creds == "unknown-policy":
        cs = f"HostName={HUB_HOST};SharedAccessKeyName=nobody;SharedAccessKey={new_key()}"
    else:
        hub.policies["reader"] = type(hub.policies["registryReadWrite"])(rights=frozenset({"RegistryRead"}))
        cs = hub.connection_string("reader")
    prov = _provisioner(hub, azure_ca, {"connectionString": cs})
    device = new_device()
    try:
        if creds == "read-only":
            await prov.check()  # reading is allowed
        else:
            with pytest.raises(CredentialsError) as info:
                await prov.check()
            assert "SharedAccessKey" not in str(info.value)
        with pytest.raises(CredentialsError):
            await prov.provision(device, {}, Recorder(), keys)
    finally:
        await prov.aclose()
    assert device.cloud_id not in hub.devices
    assert all(c.status == 401 for c in hub.calls if c.method == "PUT")


@pytest.mark.parametrize(
    ("secret", "match"),
    [
        ({}, "needs connectionString"),
        ({"connectionString": "HostName=x;DeviceId=d;SharedAccessKey=AAAA"}, "missing SharedAccessKeyName"),
        ({"tenantId": "t", "clientId": "c"}, "lack clientSecret"),
    ],
)
async def test_malformed_credentials(
    hub: HubDouble, azure_ca: CA, secret: dict[str, str], match: str
) -> None:
    prov = _provisioner(hub, azure_ca, secret)
    with pytest.raises(CredentialsError, match=match):
        await prov.check()
    assert hub.calls == []


async def test_connection_string_for_another_hub(hub: HubDouble, azure_ca: CA) -> None:
    cs = hub.connection_string().replace(HUB_HOST, "other.azure-devices.net")
    prov = _provisioner(hub, azure_ca, {"connectionString": cs})
    with pytest.raises(CredentialsError, match=r"for hub other\.azure-devices\.net"):
        await prov.check()


async def test_provision_creates_device_and_stores_material(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, key_reader: VaultKeyStore
) -> None:
    prov = _provisioner(hub, azure_ca, certificateValidityDays=30)
    device = new_device()
    rec = Recorder()
    progress: Progress = {}
    try:
        identity = await prov.provision(device, progress, rec, keys)
    finally:
        await prov.aclose()
    material = await key_reader.get(device.ref)
    info = cert_info(material.certificate_pem)
    assert info.subject_cn == device.cloud_id
    assert verify_self_signed(material.certificate_pem)
    assert identity.thumbprint == identity.certificate_id == info.sha256
    assert identity.cloud_id == device.cloud_id
    assert dt.timedelta(days=29) < info.not_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=31)
    assert hub.thumbprints(device.cloud_id) == (info.sha256, info.sha256)
    assert hub.devices[device.cloud_id]["authentication"]["type"] == "selfSigned"
    # the key was stored (and recorded) before the hub heard of the certificate
    assert [p["step"] for p in rec.saved] == ["stored", "done"]
    assert progress["renewAfter"] and progress["keyLocation"] == identity.key_location
    assert "PRIVATE" not in repr(progress)

    # provisioning again is a no-op: no new certificate, no registry write
    writes = sum(c.method == "PUT" for c in hub.calls)
    prov2 = _provisioner(hub, azure_ca)
    try:
        again = await prov2.provision(device, progress, Recorder(), keys)
    finally:
        await prov2.aclose()
    assert again == identity
    assert sum(c.method == "PUT" for c in hub.calls) == writes


async def test_existing_device_gets_its_certificate_replaced(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore
) -> None:
    device = new_device()
    foreign = cert_info(self_signed("someone-else")[0]).sha1.upper()
    prov = _provisioner(hub, azure_ca)
    try:
        # a device of that id is already in the hub (another tool, or a compromised identity)
        reg = await prov._reg()
        await reg.create(device.cloud_id, foreign, foreign)
        identity = await prov.provision(device, {}, Recorder(), keys)
    finally:
        await prov.aclose()
    assert hub.thumbprints(device.cloud_id) == (identity.thumbprint, identity.thumbprint)
    puts = [c for c in hub.calls if c.method == "PUT"]
    assert puts[-1].if_match is not None and puts[-1].status == 200  # an If-Match update, not a create


async def test_resume_after_crash_between_store_and_register(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore
) -> None:
    device = new_device()
    rec = Recorder()

    class Crash(Exception):
        pass

    async def crash_after_store(progress: Progress) -> None:
        await rec(progress)
        if progress["step"] == "stored":
            raise Crash

    prov = _provisioner(hub, azure_ca)
    try:
        with pytest.raises(Crash):
            await prov.provision(device, {}, crash_after_store, keys)
        assert device.cloud_id not in hub.devices
        stored_version = (await keys.describe(device.ref)).version  # type: ignore[union-attr]
        progress = dict(rec.saved[-1])
        identity = await prov.provision(device, progress, rec, keys)
    finally:
        await prov.aclose()
    # the stored material was reused, not replaced by a second certificate
    assert (await keys.describe(device.ref)).version == stored_version  # type: ignore[union-attr]
    assert identity.thumbprint == rec.saved[0]["thumbprint"]
    assert hub.thumbprints(device.cloud_id) == (identity.thumbprint, identity.thumbprint)


async def test_rotation_goes_through_the_secondary_slot(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, key_reader: VaultKeyStore
) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    progress: Progress = {}
    seen: list[tuple[str | None, str | None, str]] = []

    async def watch(p: Progress) -> None:
        stored = await key_reader.get(device.ref)
        seen.append((*hub.thumbprints(device.cloud_id), cert_info(stored.certificate_pem).sha256))

    try:
        old = await prov.provision(device, progress, Recorder(), keys)
        new = await prov.rotate(device, progress, watch, keys)
    finally:
        await prov.aclose()
    assert new.thumbprint != old.thumbprint
    assert hub.thumbprints(device.cloud_id) == (new.thumbprint, new.thumbprint)
    # at every checkpoint the hub accepted the certificate in the key store (no window of refusal)
    for primary, secondary, stored in seen:
        assert stored in (primary, secondary)
    assert (old.thumbprint, new.thumbprint, new.thumbprint) in seen  # new as secondary, new stored
    assert "rotation" not in progress and progress["thumbprint"] == new.thumbprint


async def test_renewal_due_at_two_thirds(hub: HubDouble, azure_ca: CA, keys: VaultKeyStore) -> None:
    prov = _provisioner(hub, azure_ca, certificateValidityDays=90)
    progress: Progress = {}
    try:
        identity = await prov.provision(new_device(), progress, Recorder(), keys)
    finally:
        await prov.aclose()
    now = dt.datetime.now(dt.UTC)
    assert not prov.renewal_due(identity, now)
    assert not prov.renewal_due(identity, now + dt.timedelta(days=59))
    assert prov.renewal_due(identity, now + dt.timedelta(days=61))
    recorded = dt.datetime.fromisoformat(progress["renewAfter"].replace("Z", "+00:00"))
    assert abs(recorded - (now + dt.timedelta(days=60))) < dt.timedelta(hours=1)
    assert renew_after(now, now + dt.timedelta(days=3)) == now + dt.timedelta(days=2)


async def test_deprovision_deletes_and_tolerates_404(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore
) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    progress: Progress = {}
    rec = Recorder()
    try:
        await prov.provision(device, progress, rec, keys)
        await prov.deprovision(device, progress, rec)
        assert device.cloud_id not in hub.devices
        assert progress["step"] == "deleted"
        # gone already (or deleted by hand): still fine
        await prov.deprovision(device, dict(rec.saved[1]), rec)
        assert hub.calls[-1].method == "GET" and hub.calls[-1].status == 404
    finally:
        await prov.aclose()
    await keys.delete(device.ref)  # the caller's half of deletion
    assert await keys.describe(device.ref) is None


async def test_deprovision_leaves_a_foreign_device_alone(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore
) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    progress: Progress = {}
    try:
        await prov.provision(device, progress, Recorder(), keys)
        other = cert_info(self_signed("x")[0]).sha256
        reg = await prov._reg()
        dev = await reg.get(device.cloud_id)
        await reg.update(device.cloud_id, dev.etag, other, other)  # type: ignore[union-attr]
        await prov.deprovision(device, progress, Recorder())
    finally:
        await prov.aclose()
    assert hub.thumbprints(device.cloud_id) == (other, other)


async def test_throttling_is_retried(hub: HubDouble, azure_ca: CA, keys: VaultKeyStore) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    hub.throttle(3)
    try:
        identity = await prov.provision(device, {}, Recorder(), keys)
    finally:
        await prov.aclose()
    assert [c.status for c in hub.calls[:3]] == [429, 429, 429]
    assert hub.thumbprints(device.cloud_id)[0] == identity.thumbprint


async def test_adopt_manual_certificate(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, key_reader: VaultKeyStore
) -> None:
    device = new_device()
    cert_pem, key_pem = self_signed(device.cloud_id, days=10)
    prov = _provisioner(hub, azure_ca)
    try:
        identity = await prov.adopt(device, KeyMaterial(cert_pem, key_pem), {}, Recorder(), keys)
        assert hub.thumbprints(device.cloud_id) == (identity.thumbprint, identity.thumbprint)
        assert (await key_reader.get(device.ref)).certificate_pem == cert_pem

        # registerCertificate: false -> the hub must already carry it
        unregistered = new_device(registerCertificate=False)
        with pytest.raises(PermanentError, match="does not carry"):
            await prov.adopt(unregistered, KeyMaterial(cert_pem, key_pem), {}, Recorder(), keys)
    finally:
        await prov.aclose()


async def test_update_retries_after_a_concurrent_change(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore
) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    progress: Progress = {}
    try:
        await prov.provision(device, progress, Recorder(), keys)
        hub.change_behind_the_back(device.cloud_id)
        new = await prov.rotate(device, progress, Recorder(), keys)
    finally:
        await prov.aclose()
    assert 412 in [c.status for c in hub.calls if c.method == "PUT"]
    assert hub.thumbprints(device.cloud_id) == (new.thumbprint, new.thumbprint)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", [0, 1, 2])
async def test_rotation_resumes_after_a_crash_at_any_step(
    hub: HubDouble, azure_ca: CA, keys: VaultKeyStore, key_reader: VaultKeyStore, crash_at: int
) -> None:
    device = new_device()
    prov = _provisioner(hub, azure_ca)
    progress: Progress = {}
    saved: list[Progress] = []
    seen = 0

    async def crashing(p: Progress) -> None:
        nonlocal seen
        saved.append(dict(p))  # persisted, then the process dies
        seen += 1
        if seen - 1 == crash_at:
            raise Crash

    try:
        old = await prov.provision(device, progress, Recorder(), keys)
        with pytest.raises(Crash):
            await prov.rotate(device, progress, crashing, keys)
        # whatever the moment, the hub accepts the certificate the proxy would read now
        stored = cert_info((await key_reader.get(device.ref)).certificate_pem).sha256
        assert stored in hub.thumbprints(device.cloud_id)
        resumed = dict(saved[-1])
        new = await prov.rotate(device, resumed, Recorder(), keys)
    finally:
        await prov.aclose()
    stored = cert_info((await key_reader.get(device.ref)).certificate_pem).sha256
    assert new.thumbprint == stored != old.thumbprint
    assert hub.thumbprints(device.cloud_id) == (stored, stored)
    assert "rotation" not in resumed


async def test_factory_builds_the_azure_provisioner(hub: HubDouble, azure_ca: CA) -> None:
    from cloudconnector.clouds.factory import make_provisioner

    endpoint = azure_endpoint(hub, azure_ca.cert_pem)
    prov = make_provisioner(endpoint, {"connectionString": hub.connection_string()}, RateLimiter(10))
    try:
        assert isinstance(prov, AzureIotHubProvisioner)
        assert (await prov.check()).host == HUB_HOST
    finally:
        await prov.aclose()
