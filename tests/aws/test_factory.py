"""The factory maps each Endpoint type to its provisioner; the MQTT one only stores credentials."""

from __future__ import annotations

from typing import Any

import pytest

from cloudconnector.clouds.aws import AwsIotProvisioner
from cloudconnector.clouds.azure import AzureIotHubProvisioner
from cloudconnector.clouds.certs import cert_info, self_signed
from cloudconnector.clouds.factory import make_provisioner
from cloudconnector.clouds.mqtt import MqttBrokerProvisioner
from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import parse_endpoint
from cloudconnector.ratelimit import RateLimiter
from tests.aws.conftest import Recorder, endpoint_manifest, fake_credentials, make_device


def _manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "ep", "namespace": "fleet"}, "spec": spec}


async def test_aws_endpoint_gets_the_aws_provisioner(moto: Any) -> None:
    endpoint = parse_endpoint(endpoint_manifest(moto.url))
    prov = make_provisioner(endpoint, fake_credentials(), RateLimiter(10))
    try:
        assert isinstance(prov, AwsIotProvisioner)
        assert (await prov.check()).port == 8883
    finally:
        await prov.aclose()


def test_azure_endpoint_gets_the_azure_provisioner() -> None:
    endpoint = parse_endpoint(
        _manifest({"type": "AzureIotHub", "azure": {"hostName": "hub.azure-devices.net"}})
    )
    assert isinstance(make_provisioner(endpoint, {}, RateLimiter(1)), AzureIotHubProvisioner)


async def test_mqtt_broker_stores_manual_credentials(keys: Any, reader: Any, namespace: str) -> None:
    endpoint = parse_endpoint(_manifest({"type": "MqttBroker", "port": 8884, "mqtt": {"host": "broker.lan"}}))
    prov = make_provisioner(endpoint, {}, RateLimiter(10))
    assert isinstance(prov, MqttBrokerProvisioner)
    info = await prov.check()
    assert (info.host, info.port) == ("broker.lan", 8884)

    device = make_device(namespace, 1)
    with pytest.raises(PermanentError) as caught:
        await prov.provision(device, {}, Recorder(), keys)
    assert caught.value.reason == "ManualCredentialsRequired"

    cert, key = self_signed("meter-0001")
    ident = await prov.adopt(device, KeyMaterial(cert, key, username="u"), {}, Recorder(), keys)
    assert ident.thumbprint == cert_info(cert).sha256 and ident.cloud_id == device.cloud_id
    stored = await reader.get(device.ref)
    assert (stored.certificate_pem, stored.private_key_pem, stored.username) == (cert, key, "u")
