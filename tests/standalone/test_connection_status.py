"""`cloud-connector status` shows a device's live connection, as kubectl does in a cluster: a
device with its own certificate (manual credentials) at a mosquitto with mutual TLS, connected
through `cloud-connector run`'s proxy, is CONNECTED true with a LAST SEEN age, then false."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.conftest import ACL, Client, broker_config
from tests.standalone.conftest import API, Site
from tests.standalone.test_cli_restart import phases, run_cli
from tests.support.pki import CA
from tests.support.procs import Mosquitto, free_port, port_open, run_mosquitto, stop, wait_for

DEVICE_IP = "127.20.0.41"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[CA, Mosquitto]]:
    ca = CA()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(tmp_path, "broker")
    (tmp_path / "acl").write_text(ACL)
    port = free_port()
    with run_mosquitto(broker_config(port, tmp_path), port) as b:
        yield ca, b


def connection(site: Site) -> dict:
    db = sqlite3.connect(site.state / "state.db")
    try:
        rows = db.execute("SELECT connection FROM connections").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()
    return json.loads(rows[0][0]) if rows else {}


def test_status_shows_the_live_connection(
    site: Site, clean_env: dict[str, str], broker: tuple[CA, Mosquitto]
) -> None:
    ca, mosquitto = broker
    issued = ca.issue("meter-41", client=True)
    ns = site.namespace
    site.write(
        "site.yaml",
        [
            {
                "apiVersion": API,
                "kind": "Endpoint",
                "metadata": {"name": "broker", "namespace": ns},
                "spec": {
                    "type": "MqttBroker",
                    "port": mosquitto.port,
                    "caCertificate": ca.cert_pem,
                    "mqtt": {"host": "localhost"},
                },
            },
            site.group("meters", "broker"),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "meter-41-tls", "namespace": ns},
                "stringData": {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem.decode()},
            },
            site.device(41, ip=DEVICE_IP, cloudId="meter-41", credentialsSecretRef={"name": "meter-41-tls"}),
        ],
    )
    port = free_port()
    env = {**clean_env, "CC_PROXY_STATUS_INTERVAL": "1"}
    cmd = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(site.manifests), "--watch"]
    cmd += ["--bind", "127.0.0.1", "--mqtt-port", str(port), "--state", str(site.state)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    device = Client("firmware", bind=DEVICE_IP)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="standalone proxy")
        wait_for(lambda: phases(site) == ["Ready"], timeout=60, what="the device Ready")
        assert device.connect(port) == 0
        device.publish("meter-41/telemetry", b"7")
        wait_for(lambda: connection(site).get("messagesUp", 0) >= 1, timeout=30, what="counters")
        live = connection(site)
        assert (live["connected"], live["transport"], live["mqttVersion"]) == (True, "Plain", "3.1.1")
        table = run_cli(site, env, "status", "devices").stdout
        header, row = table.splitlines()[:2]
        assert "CONNECTED" in header and "LAST SEEN" in header
        assert row.split()[0] == "meter-0041" and "true" in row.split()
        device.close()
        wait_for(lambda: connection(site).get("connected") is False, timeout=30, what="disconnected")
        assert "false" in run_cli(site, env, "status", "devices").stdout.splitlines()[1].split()
    finally:
        device.close()
        stop(proc)
