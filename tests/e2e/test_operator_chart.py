"""The operator as installed by the chart, on a real API server: it runs with the chart's
ServiceAccount token (so a permission missing from the chart fails here), logs in to OpenBao with
Vault's Kubernetes auth reviewing that token, and provisions on moto. Covers the README's life
cycle: Ready, status and events, conflict, rotation, migration, deletion through the finalizer,
and a SIGKILL in the middle of provisioning followed by an audit of moto and Vault."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import boto3
import hvac
import pytest
from botocore.config import Config

from tests.e2e.harness import Install, Process, install, wait_until
from tests.support.kube import Kube
from tests.support.procs import Bao, Moto

REGION = "eu-west-1"
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDE2ETESTTEST", "AWS_SECRET_ACCESS_KEY": "e2e-not-a-real-secret"}


@pytest.fixture(scope="module")
def fleet_ns(kube: Kube) -> str:
    return kube.namespace("fleet")


@pytest.fixture(scope="module")
def chart(kube: Kube, bao: Bao, fleet_ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    values = {"operator": {"secretAccess": {"namespaces": [fleet_ns]}}}
    with install(kube, bao, tmp_path_factory.mktemp("chart"), values) as inst:
        yield inst


@pytest.fixture(scope="module")
def operator(chart: Install) -> Iterator[Process]:
    proc = chart.operator()
    try:
        yield proc
    finally:
        proc.stop()
        log = proc.output()
        assert "PRIVATE KEY-----" not in log
        assert FAKE_KEYS["AWS_SECRET_ACCESS_KEY"] not in log


def iot(moto: Moto, region: str = REGION) -> Any:
    return boto3.client(
        "iot",
        region_name=region,
        endpoint_url=moto.url,
        aws_access_key_id=FAKE_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_KEYS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"total_max_attempts": 1}),
    )


def things(moto: Moto, prefix: str, region: str = REGION) -> set[str]:
    return {
        t["thingName"] for t in iot(moto, region).list_things()["things"] if t["thingName"].startswith(prefix)
    }


def vault_devices(bao: Bao, namespace: str) -> list[str]:
    root = hvac.Client(url=bao.url, token=bao.token)
    try:
        listed = root.secrets.kv.v2.list_secrets(path=f"cloud-connector/{namespace}", mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return []
    return sorted(listed["data"]["keys"])


class Fleet:
    """Endpoints, Groups and Devices in one namespace, created as a user would (kubectl apply)."""

    def __init__(self, kube: Kube, ns: str, moto: Moto) -> None:
        self.kube, self.ns, self.moto = kube, ns, moto
        self._n = 0

    def secret(self, name: str = "aws-keys") -> None:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in FAKE_KEYS.items()}
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": self.ns},
                "data": data,
            }
        )

    def endpoint(self, name: str, region: str = REGION, rate: float = 50) -> None:
        self.secret()
        self.kube.apply(
            {
                "apiVersion": "cloudconnector.io/v1alpha1",
                "kind": "Endpoint",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {
                    "type": "AwsIotCore",
                    "rateLimit": {"devicesPerSecond": rate},
                    "aws": {
                        "region": region,
                        "endpointUrl": self.moto.url,
                        "credentialsSecretRef": {"name": "aws-keys"},
                    },
                },
            }
        )

    def group(self, name: str, endpoint: str) -> None:
        self.kube.apply(
            {
                "apiVersion": "cloudconnector.io/v1alpha1",
                "kind": "Group",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"endpointRef": {"name": endpoint}},
            }
        )

    def device(
        self, name: str, group: str, ip: str | None = None, iccid: str | None = None
    ) -> dict[str, Any]:
        self._n += 1
        n = self._n
        obj = {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Device",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "group": group,
                "sim": {"iccid": iccid or f"89353012345{n:08d}", "imsi": f"2343012{n:08d}"},
                "ip": ip or f"10.66.{n // 250}.{n % 250 + 1}",
            },
        }
        self.kube.apply(obj)
        return obj

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return dict(self.kube.get(kind, self.ns, name).get("status") or {})

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            f"Device {name} {phase}",
            lambda: (s := self.status("Device", name)).get("phase") == phase and s,
            timeout,
        )

    def gone(self, name: str) -> bool:
        done = self.kube.kubectl("get", "ccd", name, "-n", self.ns, "--ignore-not-found", "-o", "name")
        return done.stdout.strip() == ""

    def event_reasons(self, name: str) -> set[str]:
        done = self.kube.kubectl(
            "get",
            "events",
            "-n",
            self.ns,
            "--field-selector",
            f"involvedObject.name={name}",
            "-o",
            "jsonpath={.items[*].reason}",
        )
        return set(done.stdout.split())


@pytest.fixture
def fleet(kube: Kube, fleet_ns: str, moto_server: Moto, operator: Process) -> Fleet:
    return Fleet(kube, fleet_ns, moto_server)


def test_life_cycle_with_the_charts_own_rights(fleet: Fleet, kube: Kube, bao: Bao, operator: Process) -> None:
    ns = fleet.ns
    fleet.endpoint("aws")
    fleet.group("meters", "aws")
    fleet.device("m1", "meters")

    # What README promises a platform engineer: kubectl wait, then the status at a glance.
    kube.kubectl("wait", "--for=condition=Ready", "ccd/m1", "-n", ns, "--timeout=90s", timeout=100)
    status = fleet.status("Device", "m1")
    cloud_id = f"{ns}_m1"
    assert status["phase"] == "Ready"
    assert status["cloudId"] == cloud_id
    assert status["endpoint"] == "aws" and status["endpointType"] == "AwsIotCore"
    assert status["certificateId"] and status["keyLocation"]
    assert "PRIVATE" not in str(status)
    row = kube.kubectl("get", "ccd", "m1", "-n", ns, "--no-headers").stdout.split()
    assert row[:4] == ["m1", "Ready", "meters", "aws"]
    assert cloud_id in things(fleet.moto, cloud_id)
    assert vault_devices(bao, ns) == ["m1"]
    wait_until("events about m1", lambda: {"Provisioned"} <= fleet.event_reasons("m1"))
    endpoint = wait_until(
        "Endpoint Ready", lambda: (s := fleet.status("Endpoint", "aws")).get("phase") == "Ready" and s
    )
    assert endpoint["host"]
    wait_until("Group counts", lambda: fleet.status("Group", "meters").get("provisioned") == 1)

    # Conflict: a second Device with the same IP; both are reported, neither is served.
    fleet.device("m2", "meters", ip=fleet.kube.get("Device", ns, "m1")["spec"]["ip"])
    fleet.wait_phase("m2", "Conflict")
    fleet.wait_phase("m1", "Conflict")
    kube.kubectl("delete", "ccd", "m2", "-n", ns, "--wait=false")
    wait_until("m2 gone", lambda: fleet.gone("m2"))
    fleet.wait_phase("m1", "Ready")

    # Rotation: a new certificate, the old one gone from the cloud.
    before = fleet.status("Device", "m1")["certificateId"]
    kube.kubectl("annotate", "ccd", "m1", "-n", ns, "cloudconnector.io/rotate=e2e-1", "--overwrite")
    rotated = wait_until(
        "rotation",
        lambda: (s := fleet.status("Device", "m1")).get("rotation", {}).get("token") == "e2e-1" and s,
    )
    assert rotated["certificateId"] != before
    certs = [c["certificateId"] for c in iot(fleet.moto).list_certificates()["certificates"]]
    assert before not in certs and rotated["certificateId"] in certs
    wait_until("rotation events", lambda: {"Rotating", "Rotated"} <= fleet.event_reasons("m1"))

    # Migration: the Device moves to a Group on an Endpoint in another region.
    fleet.endpoint("aws-central", region="eu-central-1")
    fleet.group("central", "aws-central")
    kube.kubectl("patch", "ccd", "m1", "-n", ns, "--type=merge", "-p", '{"spec":{"group":"central"}}')
    wait_until(
        "migration",
        lambda: (
            (s := fleet.status("Device", "m1")).get("endpoint") == "aws-central" and s.get("phase") == "Ready"
        ),
    )
    assert cloud_id not in things(fleet.moto, cloud_id)
    assert cloud_id in things(fleet.moto, cloud_id, "eu-central-1")

    # Deletion through the finalizer: nothing left in the cloud or in Vault.
    kube.kubectl("delete", "ccd", "m1", "-n", ns, "--timeout=60s", timeout=70)
    assert fleet.gone("m1")
    assert things(fleet.moto, cloud_id, "eu-central-1") == set()
    assert vault_devices(bao, ns) == []
    assert operator.alive()


def test_sigkill_mid_provisioning_then_audit(
    fleet: Fleet, kube: Kube, bao: Bao, chart: Install, operator: Process
) -> None:
    ns = fleet.ns
    fleet.endpoint("slow", rate=2)
    fleet.group("burst", "slow")
    names = [f"k{i}" for i in range(6)]
    for name in names:
        fleet.device(name, "burst")
    # At 2 devices/s, a kill 1.5 s in lands while most devices are still being provisioned.
    time.sleep(1.5)
    operator.kill()
    operator.start()
    for name in names:
        fleet.wait_phase(name, "Ready", timeout=90)

    # Audit: exactly one thing, one active certificate and one secret per device; no orphans.
    prefix = f"{ns}_k"
    assert things(fleet.moto, prefix) == {f"{ns}_{n}" for n in names}
    ids = {fleet.status("Device", n)["certificateId"] for n in names}
    client = iot(fleet.moto)
    for n in names:
        attached = client.list_thing_principals(thingName=f"{ns}_{n}")["principals"]
        assert len(attached) == 1, (n, attached)
    active = {
        c["certificateId"] for c in client.list_certificates()["certificates"] if c["status"] == "ACTIVE"
    }
    assert ids <= active
    assert set(vault_devices(bao, ns)) >= set(names)

    for name in names:
        kube.kubectl("delete", "ccd", name, "-n", ns, "--wait=false")
    wait_until("all deleted", lambda: all(fleet.gone(n) for n in names), timeout=90)
    assert things(fleet.moto, prefix) == set()
    assert not set(vault_devices(bao, ns)) & set(names)
