"""The proxy as installed by the chart, on a real API server: it watches Devices, Groups and
Endpoints with the chart's proxy ServiceAccount token, reads device credentials from OpenBao after a
Kubernetes-auth login with that token, and relays a device (known by its source address) to a
mosquitto that checks the device certificate (mutual TLS, the certificate's CN as user name, an ACL
keyed on it). The operator, with its own chart token, adopts the devices' certificates. The
directory follows the watch: a Device rotated, moved to another Endpoint or deleted has its session
ended."""

from __future__ import annotations

import base64
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import Install, Process, install, wait_until
from tests.proxy.conftest import ACL, Client, broker_config, client_tls
from tests.support.kube import Kube
from tests.support.pki import CA
from tests.support.procs import Bao, Mosquitto, free_port, run_mosquitto

DEVICE_IP = "127.0.0.61"


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ca = CA()
        (d / "ca.crt").write_text(self.ca.cert_pem)
        self.ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
        (d / "acl").write_text(ACL)
        self.admin = self.ca.issue("admin", client=True)

    def client_files(self, issued: Any, stem: str) -> tuple[str, str]:
        c, k = issued.write(self.dir, stem)
        return str(c), str(k)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("e2e-pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[Mosquitto]:
    port = free_port()
    with run_mosquitto(broker_config(port, pki.dir), port) as b:
        yield b


@pytest.fixture(scope="module")
def ns(kube: Kube) -> str:
    return kube.namespace("devices")


@pytest.fixture(scope="module")
def chart(kube: Kube, bao: Bao, ns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    values = {"operator": {"secretAccess": {"namespaces": [ns]}}}
    with install(kube, bao, tmp_path_factory.mktemp("chart"), values) as inst:
        yield inst


@pytest.fixture(scope="module")
def running(chart: Install) -> Iterator[tuple[Process, Process, int]]:
    operator = chart.operator()
    # Counters refreshed every second instead of every minute, so the test sees them soon.
    proxy, port = chart.proxy(CC_PROXY_STATUS_INTERVAL="1")
    try:
        yield operator, proxy, port
    finally:
        for proc in (proxy, operator):
            proc.stop()
            assert "PRIVATE KEY-----" not in proc.output()


def _obj(kind: str, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cloudconnector.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def test_the_directory_follows_devices_through_the_watch(
    kube: Kube, pki: Pki, broker: Mosquitto, ns: str, running: tuple[Process, Process, int]
) -> None:
    operator, proxy, port = running
    for name in ("broker-a", "broker-b"):
        kube.apply(
            _obj(
                "Endpoint",
                ns,
                name,
                {
                    "type": "MqttBroker",
                    "port": broker.port,
                    "caCertificate": pki.ca.cert_pem,
                    "mqtt": {"host": "localhost"},
                },
            )
        )
    kube.apply(_obj("Group", ns, "a", {"endpointRef": {"name": "broker-a"}}))
    kube.apply(_obj("Group", ns, "b", {"endpointRef": {"name": "broker-b"}}))
    # The device's own certificate (CN = its cloud id), handed over once in a Secret.
    cloud_id = "meter-61"
    issued = pki.ca.issue(cloud_id, client=True)
    data = {
        "tls.crt": base64.b64encode(issued.cert_pem.encode()).decode(),
        "tls.key": base64.b64encode(issued.key_pem).decode(),
    }
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "meter-61-tls", "namespace": ns},
            "type": "kubernetes.io/tls",
            "data": data,
        }
    )
    kube.apply(
        _obj(
            "Device",
            ns,
            "meter-61",
            {
                "group": "a",
                "sim": {"iccid": "8935301234500000061"},
                "ip": DEVICE_IP,
                "cloudId": cloud_id,
                "credentialsSecretRef": {"name": "meter-61-tls"},
            },
        )
    )
    kube.kubectl("wait", "--for=condition=Ready", "ccd/meter-61", "-n", ns, "--timeout=90s", timeout=100)

    admin = Client(f"admin-{time.monotonic_ns()}", tls=client_tls(pki, pki.admin, "admin"))  # type: ignore[arg-type]
    device = Device(port)
    try:
        assert admin.connect(broker.port, host="localhost") == 0
        admin.subscribe("#")
        # The proxy learns the Device through its watch: connect until it is known.
        wait_until("the proxy to serve the device", lambda: device.connect() == 0, timeout=60, interval=0.5)
        assert device.client is not None
        device.client.publish(f"{cloud_id}/telemetry", b"21.5")
        got = admin.expect()
        # The broker's ACL lets only the certificate with CN meter-61 write below meter-61/.
        assert (got.topic, got.payload) == (f"{cloud_id}/telemetry", b"21.5")

        # Live connection status, written by the proxy with its chart token.
        def connection() -> dict[str, Any]:
            return dict(kube.get("Device", ns, "meter-61").get("status", {}).get("connection") or {})

        live = wait_until(
            "status.connection with the message counted",
            lambda: (c := connection()).get("messagesUp", 0) >= 1 and c,
        )
        assert live["connected"] is True and live["proxy"] == proxy.env["CC_PROXY_POD_NAME"]
        assert (live["mqttVersion"], live["transport"]) == ("3.1.1", "Plain")
        assert live["bytesUp"] > 0 and live["tlsBytesSaved"] > 0  # the cloud-side TLS it did not pay for
        row = kube.kubectl(
            "get",
            "ccd",
            "meter-61",
            "-n",
            ns,
            "-o",
            "custom-columns=C:.status.connection.connected",
            "--no-headers",
        )
        assert row.stdout.strip() == "true"
        # The Group counts it (the operator, from the same status).
        wait_until(
            "the Group's connected count",
            lambda: kube.get("Group", ns, "a").get("status", {}).get("connected") == 1,
        )

        # Rotated (a broker's device brings its own certificate: a new one in its Secret, then the
        # rotate annotation): the session under the old certificate is ended, the next one works.
        before = kube.get("Device", ns, "meter-61")["status"]["certificateId"]
        renewed = pki.ca.issue(cloud_id, client=True)
        data = {
            "tls.crt": base64.b64encode(renewed.cert_pem.encode()).decode(),
            "tls.key": base64.b64encode(renewed.key_pem).decode(),
        }
        kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "meter-61-tls", "namespace": ns},
                "type": "kubernetes.io/tls",
                "data": data,
            }
        )
        kube.kubectl("annotate", "ccd", "meter-61", "-n", ns, "cloudconnector.io/rotate=r1", "--overwrite")
        device.ended()
        rotated = wait_until(
            "the rotation",
            lambda: (
                (s := kube.get("Device", ns, "meter-61")["status"]).get("rotation", {}).get("token") == "r1"
                and s
            ),
        )
        assert rotated["certificateId"] != before and rotated["phase"] == "Ready"
        wait_until(
            "the proxy to serve the rotated device", lambda: device.connect() == 0, timeout=60, interval=0.5
        )
        assert device.client is not None
        device.client.publish(f"{cloud_id}/telemetry", b"22.0")
        assert admin.expect().payload == b"22.0"

        # Moved to a Group on another Endpoint: the live session is ended, the next one works.
        kube.kubectl("patch", "ccd", "meter-61", "-n", ns, "--type=merge", "-p", '{"spec":{"group":"b"}}')
        device.ended()
        wait_until("the ended session shown", lambda: connection().get("connected") is False)
        wait_until(
            "the device Ready at broker-b",
            lambda: (
                kube.get("Device", ns, "meter-61").get("status", {}).get("endpoint") == "broker-b"
                and kube.get("Device", ns, "meter-61")["status"].get("phase") == "Ready"
            ),
        )
        wait_until(
            "the proxy to serve the moved device", lambda: device.connect() == 0, timeout=60, interval=0.5
        )

        # Deleted: the session is ended and the address is no longer served.
        kube.kubectl("delete", "ccd", "meter-61", "-n", ns, "--wait=false")
        device.ended()
        wait_until(
            "the proxy to refuse the deleted device", lambda: device.connect() != 0, timeout=60, interval=0.5
        )
        assert proxy.alive() and operator.alive()
    finally:
        device.close()
        admin.close()


class Device:
    """The device's firmware: one MQTT client at a time, from the SIM's address."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: Client | None = None

    def connect(self) -> int:
        """One attempt: the CONNACK code, or -1 if the proxy closed the connection without one."""
        self.close()
        self.client = Client("firmware-default-id", bind=DEVICE_IP)
        try:
            return self.client.connect(self.port, timeout=5)
        except (OSError, queue.Empty):
            return -1

    def ended(self, timeout: float = 60) -> int:
        assert self.client is not None
        return self.client.disconnects.get(timeout=timeout)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
