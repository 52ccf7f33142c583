"""Fixtures for the Azure tests: the IoT Hub registry double over HTTPS and a real Vault key store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.model import Endpoint, parse_device, parse_endpoint
from tests.azure.hub_double import HubDouble
from tests.support.pki import CA
from tests.support.procs import Bao
from tests.support.vault import bootstrapped, mint_token

HUB_HOST = "test-hub.azure-devices.net"


@pytest.fixture(scope="session")
def azure_ca() -> CA:
    return CA("Azure Tests CA")


@pytest.fixture
async def hub(azure_ca: CA) -> AsyncIterator[HubDouble]:
    double = HubDouble(HUB_HOST, azure_ca)
    async with double.serve():
        yield double


@pytest.fixture(scope="session")
def vault_tokens(bao: Bao) -> tuple[str, str, str]:
    root = bootstrapped(bao)
    return bao.url, mint_token(root, OPERATOR_POLICY), mint_token(root, PROXY_POLICY)


@pytest.fixture
def keys(vault_tokens: tuple[str, str, str]) -> Iterator[VaultKeyStore]:
    url, operator, _ = vault_tokens
    store = VaultKeyStore(VaultConfig(address=url, token=operator))
    yield store
    store.close()


@pytest.fixture
def key_reader(vault_tokens: tuple[str, str, str]) -> Iterator[VaultKeyStore]:
    url, _, proxy = vault_tokens
    store = VaultKeyStore(VaultConfig(address=url, token=proxy))
    yield store
    store.close()


def azure_endpoint(hub: HubDouble, ca_pem: str, **azure: Any) -> Endpoint:
    return parse_endpoint(
        {
            "metadata": {"namespace": "azure-tests", "name": "hub", "generation": 1},
            "spec": {
                "type": "AzureIotHub",
                "caCertificate": ca_pem,
                "rateLimit": {"devicesPerSecond": 1000},
                "azure": {
                    "hostName": HUB_HOST,
                    "credentialsSecretRef": {"name": "hub-creds"},
                    "registryUrl": hub.url,
                    **azure,
                },
            },
        }
    )


def new_device(name: str | None = None, **spec: Any):  # type: ignore[no-untyped-def]
    name = name or f"dev-{uuid.uuid4().hex[:8]}"
    return parse_device(
        {
            "metadata": {"namespace": "azure-tests", "name": name, "generation": 1},
            "spec": {"group": "g", "sim": {"iccid": "8946000000000000001"}, **spec},
        }
    )
