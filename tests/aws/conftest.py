"""Fixtures for the AWS IoT provisioner: moto over HTTP, the real Vault key store, manifests."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.config import Config

from cloudconnector.clouds.aws import AwsIotProvisioner
from cloudconnector.clouds.aws_api import RetryPolicy
from cloudconnector.clouds.base import Progress
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.model import Device, Endpoint, parse_device, parse_endpoint
from cloudconnector.ratelimit import RateLimiter
from tests.support.procs import Bao, Moto
from tests.support.vault import bootstrapped, mint_token

REGION = "eu-west-1"
FAST_RETRY = RetryPolicy(attempts=10, base=0.01, cap=0.1, give_up_delay=1.0)


class Crash(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


@dataclass
class Recorder:
    """A checkpoint that keeps what was saved and can 'crash' at the k-th save.

    With ``lose=False`` the k-th record is kept (the process died right after writing it); with
    ``lose=True`` it is not (the process died after the step but before recording it).
    """

    crash_at: int | None = None
    lose: bool = False
    saved: list[Progress] = field(default_factory=list)
    calls: int = 0

    async def __call__(self, progress: Progress) -> None:
        self.calls += 1
        crash = self.crash_at is not None and self.calls >= self.crash_at
        if not (crash and self.lose):
            self.saved.append(copy.deepcopy(progress))
        if crash:
            raise Crash(f"crash at checkpoint {self.calls}")

    @property
    def last(self) -> Progress:
        return copy.deepcopy(self.saved[-1]) if self.saved else {}


def fake_credentials() -> dict[str, str]:
    # Made up per run: moto accepts any key unless its IAM emulation is switched on.
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + uuid.uuid4().hex[:16].upper(),
        "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8],
    }


def endpoint_manifest(url: str, **aws: Any) -> dict[str, Any]:
    spec_aws = {"region": REGION, "endpointUrl": url, "credentialsSecretRef": {"name": "aws-iam"}}
    spec_aws.update(aws)
    rate = spec_aws.pop("rate", 1000)
    return {
        "apiVersion": "cloudconnector.io/v1alpha1",
        "kind": "Endpoint",
        "metadata": {"name": "aws-test", "namespace": "fleet", "generation": 1},
        "spec": {"type": "AwsIotCore", "rateLimit": {"devicesPerSecond": rate}, "aws": spec_aws},
    }


def make_endpoint(url: str, **aws: Any) -> Endpoint:
    return parse_endpoint(endpoint_manifest(url, **aws))


def make_device(namespace: str, index: int, **spec: Any) -> Device:
    body: dict[str, Any] = {
        "group": "meters",
        "sim": {"iccid": f"89353012345678{index:05d}", "imsi": f"23430123{index:07d}"},
        "ip": f"10.64.{index // 250}.{index % 250 + 1}",
    }
    body.update(spec)
    return parse_device(
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": f"meter-{index:04d}", "namespace": namespace, "generation": 1},
            "spec": body,
        }
    )


@pytest.fixture
def moto(moto_server: Moto) -> Moto:
    moto_server.reset()
    return moto_server


@pytest.fixture
def iot(moto: Moto) -> Any:
    """A plain boto3 client straight to moto, for looking at what the provisioner left."""
    creds = fake_credentials()
    return boto3.client(
        "iot",
        region_name=REGION,
        endpoint_url=moto.url,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"total_max_attempts": 1}),
    )


@dataclass
class VaultRoles:
    url: str
    operator_token: str
    proxy_token: str


@pytest.fixture(scope="session")
def vault_roles(bao: Bao) -> VaultRoles:
    root = bootstrapped(bao)
    return VaultRoles(bao.url, mint_token(root, OPERATOR_POLICY), mint_token(root, PROXY_POLICY))


@pytest.fixture
def keys(vault_roles: VaultRoles) -> Iterator[VaultKeyStore]:
    """The operator's side of the key store: may write, never read back."""
    store = VaultKeyStore(VaultConfig(address=vault_roles.url, token=vault_roles.operator_token))
    yield store
    store.close()


@pytest.fixture
def reader(vault_roles: VaultRoles) -> Iterator[VaultKeyStore]:
    """The proxy's side: may read and decrypt."""
    store = VaultKeyStore(VaultConfig(address=vault_roles.url, token=vault_roles.proxy_token))
    yield store
    store.close()


@pytest.fixture
def namespace() -> str:
    return f"aws-{uuid.uuid4().hex[:8]}"


ProvisionerMaker = Callable[..., AwsIotProvisioner]


@pytest.fixture
async def make_provisioner(moto: Moto) -> AsyncIterator[ProvisionerMaker]:
    made: list[AwsIotProvisioner] = []

    def make(
        url: str | None = None,
        *,
        credentials: dict[str, str] | None = None,
        rate: float = 1000.0,
        retry: RetryPolicy = FAST_RETRY,
        **aws: Any,
    ) -> AwsIotProvisioner:
        endpoint = make_endpoint(url or moto.url, **aws)
        p = AwsIotProvisioner(
            endpoint,
            fake_credentials() if credentials is None else credentials,
            RateLimiter(rate),
            retry=retry,
        )
        made.append(p)
        return p

    yield make
    for p in made:
        await p.aclose()


def iot_inventory(iot: Any) -> dict[str, Any]:
    """Everything the tests care about in the emulated account."""
    certs = iot.list_certificates()["certificates"]
    things = [t["thingName"] for t in iot.list_things()["things"]]
    policies = [p["policyName"] for p in iot.list_policies()["policies"]]
    return {
        "things": sorted(things),
        "certs": {c["certificateId"]: c["status"] for c in certs},
        "arns": {c["certificateId"]: c["certificateArn"] for c in certs},
        "policies": sorted(policies),
    }
