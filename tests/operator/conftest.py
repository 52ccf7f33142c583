"""Fixtures for the operator tests: kmock as the API server (real HTTP), the operator as a real
subprocess (``python -m cloudconnector.operator.main``), moto for AWS and OpenBao for the keys.

kmock 0.8 needs a few things for kopf: the bundled built-in resources (events, namespaces), our
three CRDs registered as namespaced resources with a status subresource, and objects created with
a resourceVersion (kmock stores bodies as given and never invents one).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import hvac
import kmock as kmocklib
import pytest
from botocore.config import Config

from cloudconnector import api
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.kube import SECRETS, KubeClient, KubeConfig, Resource
from tests.operator.apiserver import ApiServer, register_crds
from tests.support.procs import Bao, Moto, Process, run_bao
from tests.support.vault import bootstrapped, mint_token

ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = Resource(api.GROUP, api.VERSION, api.ENDPOINTS)
GROUPS = Resource(api.GROUP, api.VERSION, api.GROUPS)
DEVICES = Resource(api.GROUP, api.VERSION, api.DEVICES)
REGION = "eu-west-1"
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDTESTTESTTEST", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret"}
DEADLINE = 60.0


@dataclass
class Cluster:
    """The test's side of the API server: creates objects and reads them back over HTTP."""

    kmock: kmocklib.KubernetesEmulator
    client: KubeClient
    namespace: str
    url: str

    async def create(self, res: Resource, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
        body = {
            "apiVersion": f"{api.GROUP}/{api.VERSION}",
            "kind": {ENDPOINTS: "Endpoint", GROUPS: "Group", DEVICES: "Device"}[res],
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                **meta,
            },
            "spec": spec,
        }
        return await self.client.create(res, self.namespace, body)

    async def secret(self, name: str, data: dict[str, bytes | str]) -> None:
        encoded = {
            k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()
        }
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": self.namespace},
            "data": encoded,
        }
        await self.client.create(SECRETS, self.namespace, body)

    async def get(self, res: Resource, name: str) -> dict[str, Any] | None:
        return await self.client.get(res, self.namespace, name)

    async def patch(self, res: Resource, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.client.patch(res, self.namespace, name, patch)

    async def delete(self, res: Resource, name: str) -> None:
        await self.client.request("DELETE", res.path(self.namespace, name))

    async def wait_for(
        self, res: Resource, name: str, check: Callable[[dict[str, Any] | None], bool], what: str = ""
    ) -> dict[str, Any] | None:
        """Poll until ``check(object)`` holds; fail with the last seen object after a deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        obj = None
        while loop.time() < deadline:
            obj = await self.get(res, name)
            if check(obj):
                return obj
            await asyncio.sleep(0.2)
        status = (obj or {}).get("status")
        raise AssertionError(f"{res.plural}/{name}: {what or 'condition'} not reached; status={status}")

    async def wait_phase(self, res: Resource, name: str, phase: str) -> dict[str, Any]:
        obj = await self.wait_for(
            res, name, lambda o: (o or {}).get("status", {}).get("phase") == phase, phase
        )
        assert obj is not None
        return obj

    async def wait_gone(self, res: Resource, name: str) -> None:
        await self.wait_for(res, name, lambda o: o is None, "deletion")

    async def wait_events(self, name: str, reasons: set[str]) -> list[dict[str, Any]]:
        """Wait until events with all ``reasons`` were posted about ``name`` (kopf posts them
        from a queue, shortly after the status write that the test may have seen first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            events = self.events(name)
            if reasons <= {e.get("reason") for e in events}:
                return events
            if loop.time() > deadline:
                raise AssertionError(f"events {reasons} about {name} not posted; got {events}")
            await asyncio.sleep(0.1)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Events stored about ``name`` (newest last)."""
        found = []
        for (resource, _ns, _name), obj in self.kmock.objects.items():
            if resource.plural == "events" and not obj.deleted:
                event = obj.raw
                if (event.get("involvedObject") or {}).get("name") == name:
                    found.append(event)
        return found


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with ApiServer() as kmock, kmocklib.Server(kmock):
        register_crds(kmock)
        url = str(kmock.url).rstrip("/")
        client = KubeClient(KubeConfig(server=url))
        namespace = f"t-{uuid.uuid4().hex[:8]}"
        try:
            yield Cluster(kmock, client, namespace, url)
        finally:
            await client.aclose()


@dataclass
class Vault:
    url: str
    root: hvac.Client
    operator_token: str
    proxy_token: str

    def secret_paths(self, namespace: str) -> list[str]:
        try:
            listed = self.root.secrets.kv.v2.list_secrets(
                path=f"cloud-connector/{namespace}", mount_point="secret"
            )
        except hvac.exceptions.InvalidPath:
            return []
        return sorted(listed["data"]["keys"])


@pytest.fixture(scope="session")
def vault(bao: Bao) -> Vault:
    root = bootstrapped(bao)
    return Vault(bao.url, root, mint_token(root, OPERATOR_POLICY, "2h"), mint_token(root, PROXY_POLICY, "2h"))


@pytest.fixture
def spare_bao() -> Iterator[Bao]:
    """A private OpenBao for a test that freezes it."""
    with run_bao() as server:
        yield server


@pytest.fixture
def aws(moto_server: Moto) -> Callable[[str], Any]:
    """A plain boto3 IoT client on moto, to look at what the operator left there."""
    moto_server.reset()

    def client(region: str = REGION) -> Any:
        return boto3.client(
            "iot",
            region_name=region,
            endpoint_url=moto_server.url,
            aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"total_max_attempts": 1}),
        )

    return client


class OperatorProcess(Process):
    """``python -m cloudconnector.operator.main`` against kmock; killable like a real pod."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__([sys.executable, "-m", "cloudconnector.operator.main"], env, log)


@pytest.fixture
def operator_env(cluster: Cluster, vault: Vault) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_", "KUBE"))}
    env.update(
        CLOUDCONNECTOR_K8S_SERVER=cluster.url,
        CLOUDCONNECTOR_NAMESPACES=cluster.namespace,
        CLOUDCONNECTOR_PEERING="off",
        CLOUDCONNECTOR_NAMESPACE_SCANNING="off",
        CLOUDCONNECTOR_CONSISTENCY_TIMEOUT="0.5",
        CLOUDCONNECTOR_STATUS_INTERVAL="1",
        CLOUDCONNECTOR_CONFLICT_RECHECK="1",
        CLOUDCONNECTOR_ENDPOINT_RECHECK="2",
        CLOUDCONNECTOR_CREDENTIALS_RETRY="2",
        VAULT_ADDR=vault.url,
        VAULT_TOKEN=vault.operator_token,
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@pytest.fixture
def operator(operator_env: dict[str, str]) -> Iterator[OperatorProcess]:
    with tempfile.TemporaryDirectory(prefix="operator-") as tmp:
        op = OperatorProcess(operator_env, Path(tmp) / "operator.log")
        op.start()
        try:
            yield op
        finally:
            op.stop()
            for run in op.runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()
            log = op.output()
            # Secrets must never reach the operator's output.
            assert "BEGIN RSA PRIVATE KEY" not in log and "PRIVATE KEY-----" not in log
            assert FAKE_KEYS["AWS_SECRET_ACCESS_KEY"] not in log
            if os.environ.get("CLOUDCONNECTOR_TEST_SHOW_LOG"):
                print(log)


Maker = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def fleet(cluster: Cluster, moto_server: Moto) -> Fleet:
    return Fleet(cluster, moto_server.url)


@dataclass
class Fleet:
    """Builders for Endpoints, Groups and Devices in the test's namespace."""

    cluster: Cluster
    moto_url: str
    _sims: int = 0

    async def endpoint(
        self,
        name: str,
        *,
        region: str = REGION,
        prefix: str = "",
        secret: str = "aws-keys",
        make_secret: bool = True,
        rate: float = 50,
        endpoint_url: str | None = None,
    ) -> dict[str, Any]:
        exists = await self.cluster.client.get(SECRETS, self.cluster.namespace, secret) is not None
        if make_secret and not exists:
            await self.cluster.secret(secret, dict(FAKE_KEYS))
        aws: dict[str, Any] = {
            "region": region,
            "endpointUrl": endpoint_url or self.moto_url,
            "thingPrefix": prefix,
        }
        aws["credentialsSecretRef"] = {"name": secret}
        spec = {"type": "AwsIotCore", "rateLimit": {"devicesPerSecond": rate}, "aws": aws}
        return await self.cluster.create(ENDPOINTS, name, spec)

    async def group(self, name: str, endpoint: str) -> dict[str, Any]:
        return await self.cluster.create(GROUPS, name, {"endpointRef": {"name": endpoint}})

    def sim(self) -> tuple[str, str, str]:
        self._sims += 1
        n = self._sims
        return f"89353012345{n:08d}", f"2343012{n:08d}", f"10.64.{n // 250}.{n % 250 + 1}"

    async def device(self, name: str, group: str, **spec: Any) -> dict[str, Any]:
        iccid, imsi, ip = self.sim()
        body = {"group": group, "sim": {"iccid": iccid, "imsi": imsi}, "ip": ip}
        body.update(spec)
        return await self.cluster.create(DEVICES, name, body)
