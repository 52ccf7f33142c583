"""Fixtures for the standalone mode: a manifest directory, a state directory, and moto."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml

from cloudconnector.standalone.app import Standalone, standalone
from cloudconnector.standalone.keys import open_key_stores
from tests.support.procs import Moto

API = "cloudconnector.io/v1alpha1"


@dataclass
class Site:
    """One test's manifests, state and its own corner of the shared moto account."""

    manifests: Path
    state: Path
    moto_url: str
    prefix: str  # thing name prefix: this test's things, whatever other tests left in moto
    namespace: str = "fleet"

    def endpoint(self, name: str = "aws", *, prefix: str | None = None, rate: float = 50.0) -> list[dict]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"{name}-iam", "namespace": self.namespace},
                "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
            },
            {
                "apiVersion": API,
                "kind": "Endpoint",
                "metadata": {"name": name, "namespace": self.namespace},
                "spec": {
                    "type": "AwsIotCore",
                    "rateLimit": {"devicesPerSecond": rate},
                    "aws": {
                        "region": "eu-west-1",
                        "endpointUrl": self.moto_url,
                        "dataEndpoint": "127.0.0.1",
                        "thingPrefix": prefix if prefix is not None else self.prefix,
                        "credentialsSecretRef": {"name": f"{name}-iam"},
                    },
                },
            },
        ]

    def group(self, name: str, endpoint: str = "aws") -> dict:
        return {
            "apiVersion": API,
            "kind": "Group",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"endpointRef": {"name": endpoint}},
        }

    def device(self, index: int, group: str = "meters", **spec: object) -> dict:
        return {
            "apiVersion": API,
            "kind": "Device",
            "metadata": {"name": f"meter-{index:04d}", "namespace": self.namespace},
            "spec": {
                "group": group,
                "sim": {"iccid": f"89353{index:014d}"},
                "ip": f"10.64.{index // 250}.{index % 250 + 1}",
                **spec,
            },
        }

    def write(self, filename: str, docs: list[dict]) -> Path:
        path = self.manifests / filename
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return path

    def standard(self, devices: int, *, rate: float = 50.0) -> None:
        self.write("endpoint.yaml", [*self.endpoint(rate=rate), self.group("meters")])
        self.write("devices.yaml", [self.device(i) for i in range(devices)])

    def iot(self):
        return boto3.client(
            "iot",
            endpoint_url=self.moto_url,
            region_name="eu-west-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def things(self, prefix: str | None = None) -> list[str]:
        prefix = self.prefix if prefix is None else prefix
        names = [t["thingName"] for t in self.iot().list_things(maxResults=250).get("things", [])]
        return sorted(n for n in names if n.startswith(prefix))

    def certificates_of(self, thing: str) -> list[str]:
        return self.iot().list_thing_principals(thingName=thing).get("principals", [])


@pytest.fixture
def site(tmp_path: Path, moto_server: Moto) -> Iterator[Site]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    yield Site(manifests, tmp_path / "state", moto_server.url, f"t{uuid.uuid4().hex[:8]}-")
    moto_server.reset()  # leave the shared moto as empty as we found it


@pytest.fixture
def clean_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment for subprocess runs: no Vault, no ambient AWS credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_", "CLOUDCONNECTOR_"))}
    yield env


@pytest.fixture
async def instance(site: Site) -> AsyncIterator[Standalone]:
    keys = open_key_stores(site.state, env={})
    async with standalone(site.manifests, site.state, keys=keys) as sa:
        yield sa
