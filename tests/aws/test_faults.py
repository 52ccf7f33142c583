"""Throttling, rejected credentials and the rate limit, through a real HTTP fault proxy."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from cloudconnector.clouds.aws_api import RetryPolicy
from cloudconnector.errors import CredentialsError, TransientError
from tests.aws.conftest import Recorder, fake_credentials, iot_inventory, make_device
from tests.support.faults import (
    EXPIRED_TOKEN,
    INTERNAL_FAILURE,
    SERVICE_UNAVAILABLE,
    THROTTLING,
    THROTTLING_429,
    UNRECOGNIZED_CLIENT,
    FaultProxy,
)
from tests.support.procs import Moto, run_moto


@pytest.fixture
async def proxy(moto: Moto) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(moto.url) as p:
        yield p


@pytest.mark.parametrize("fault", [THROTTLING, THROTTLING_429], ids=["400", "429"])
async def test_throttled_provisioning_still_completes(
    make_provisioner: Any, proxy: FaultProxy, iot: Any, keys: Any, namespace: str, fault: Any
) -> None:
    proxy.arm(fault, first=5, fraction=0.3)
    prov = make_provisioner(proxy.url)
    devices = [make_device(namespace, i) for i in range(6)]
    await asyncio.gather(*(prov.provision(d, {}, Recorder(), keys) for d in devices))
    assert proxy.faulted >= 5
    inv = iot_inventory(iot)
    assert sorted(inv["certs"].values()) == ["ACTIVE"] * 6
    assert inv["things"] == sorted(d.cloud_id for d in devices)


async def test_throttling_that_does_not_end_is_transient_and_resumable(
    make_provisioner: Any, proxy: FaultProxy, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner(proxy.url, retry=RetryPolicy(attempts=3, base=0.01, cap=0.02, give_up_delay=7.0))
    device = make_device(namespace, 1)
    rec = Recorder()
    await prov.check()
    proxy.arm(THROTTLING, fraction=1.0)
    with pytest.raises(TransientError) as caught:
        await prov.provision(device, {}, rec, keys)
    assert caught.value.reason == "Throttled" and caught.value.delay == 7.0
    assert "ThrottlingException" in str(caught.value)
    proxy.disarm()
    ident = await prov.provision(device, rec.last, Recorder(), keys)
    assert iot_inventory(iot)["certs"] == {ident.certificate_id: "ACTIVE"}


@pytest.mark.parametrize("fault", [UNRECOGNIZED_CLIENT, EXPIRED_TOKEN], ids=["unrecognized", "expired"])
async def test_rejected_keys_are_a_credentials_error(
    make_provisioner: Any, proxy: FaultProxy, keys: Any, namespace: str, fault: Any
) -> None:
    creds = fake_credentials()
    prov = make_provisioner(proxy.url, credentials=creds)
    proxy.arm(fault, fraction=1.0)
    with pytest.raises(CredentialsError) as caught:
        await prov.check()
    with pytest.raises(CredentialsError):
        await prov.provision(make_device(namespace, 1), {}, Recorder(), keys)
    text = str(caught.value)
    assert fault.code in text and "DescribeEndpoint" in text
    assert creds["AWS_SECRET_ACCESS_KEY"] not in text and creds["AWS_ACCESS_KEY_ID"] not in text
    assert proxy.faulted == 2  # never retried: retrying cannot fix wrong keys


@pytest.fixture
def moto_with_iam() -> Iterator[Moto]:
    """A private moto that checks every request's access key against its IAM emulation."""
    with run_moto() as server:
        req = urllib.request.Request(
            f"{server.url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=5).close()
        yield server


async def test_unknown_keys_rejected_by_moto_iam(make_provisioner: Any, moto_with_iam: Moto) -> None:
    prov = make_provisioner(moto_with_iam.url)
    with pytest.raises(CredentialsError, match="credentials"):
        await prov.check()


def test_missing_key_in_secret_is_a_credentials_error(make_provisioner: Any) -> None:
    with pytest.raises(CredentialsError, match="AWS_SECRET_ACCESS_KEY"):
        make_provisioner(credentials={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE00"})


async def test_rate_limit_paces_devices(
    make_provisioner: Any, proxy: FaultProxy, keys: Any, namespace: str
) -> None:
    """30 devices at 10/s: the cloud sees new devices no faster than the limit allows."""
    prov = make_provisioner(proxy.url, rate=10.0)
    devices = [make_device(namespace, i) for i in range(30)]
    await asyncio.gather(*(prov.provision(d, {}, Recorder(), keys) for d in devices))
    # A device's first request is its DescribeThing, sent right after it got its token.
    starts = sorted(s.at for s in proxy.seen if s.method == "GET" and s.path.startswith("/things/"))
    assert len(starts) == 30
    assert starts[-1] - starts[0] >= 2.8  # 29 intervals of 0.1 s, minus request jitter
    # No one-second window holds more than the burst plus ten.
    for i in range(len(starts) - 11):
        assert starts[i + 11] - starts[i] >= 0.95


async def test_lost_answer_to_create_keys_is_swept_on_retry(
    make_provisioner: Any, proxy: FaultProxy, iot: Any, keys: Any, namespace: str
) -> None:
    """AWS made the certificate but its answer was a 500: not retried blindly (that would make
    a second one); the next attempt deletes the orphan and makes exactly one."""
    prov = make_provisioner(proxy.url)
    device = make_device(namespace, 1)
    proxy.arm(INTERNAL_FAILURE, first=1, path="/keys-and-certificate", after_upstream=True)
    rec = Recorder()
    with pytest.raises(TransientError) as caught:
        await prov.provision(device, {}, rec, keys)
    assert caught.value.reason == "Unavailable"
    assert proxy.faulted == 1
    assert len(iot_inventory(iot)["certs"]) == 1  # the orphan
    ident = await prov.provision(device, rec.last, Recorder(), keys)
    assert iot_inventory(iot)["certs"] == {ident.certificate_id: "ACTIVE"}


async def test_service_unavailable_on_idempotent_calls_is_retried(
    make_provisioner: Any, proxy: FaultProxy, iot: Any, keys: Any, namespace: str
) -> None:
    proxy.arm(SERVICE_UNAVAILABLE, first=4, path="/things/")
    ident = await make_provisioner(proxy.url).provision(make_device(namespace, 1), {}, Recorder(), keys)
    assert proxy.faulted == 4
    assert iot_inventory(iot)["certs"] == {ident.certificate_id: "ACTIVE"}


async def test_no_credentials_anywhere_is_a_credentials_error(
    make_provisioner: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """An Endpoint without a Secret uses the SDK's default chain; here that chain is empty."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CredentialsError, match="no usable AWS credentials"):
        await make_provisioner(credentials={}).check()
