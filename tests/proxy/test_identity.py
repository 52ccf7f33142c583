"""Other ways in: identity by ICCID (client id or user name), the default trust setting, and a
generic MQTT broker that wants a user name and password from the key store."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from tests.proxy.conftest import (
    Client,
    Pki,
    ProxyThread,
    World,
    broker_log,
    proxy_config,
    raw_connect,
    recv_all,
)
from tests.support.procs import Mosquitto, free_port, run_mosquitto

NOWHERE = "127.0.8.8"  # an address no device has: identity must come from the CONNECT


@pytest.mark.parametrize("mode", ["client_id", "username"])
def test_identity_by_iccid(
    pki: Pki, world: World, broker: Mosquitto, clients: list[Client], mode: str
) -> None:
    pt = ProxyThread(proxy_config(pki, identity=(mode,)), world)
    try:
        route = world.add()
        connect = Connect(route.iccid) if mode == "client_id" else Connect("any", username=route.iccid)
        s = raw_connect(pt.port, NOWHERE, codec.encode(connect))
        assert s.recv(4) == b"\x20\x02\x00\x00"
        s.close()
        assert f"as {route.client_id} " in broker_log(broker)
        s = raw_connect(pt.port, NOWHERE, codec.encode(Connect("8935309999999999999")))
        assert recv_all(s) == b"\x20\x02\x00\x05"
    finally:
        pt.close()


def test_ip_identity_ignores_iccid_claims(world: World, proxy: ProxyThread) -> None:
    route = world.add()
    s = raw_connect(proxy.port, NOWHERE, codec.encode(Connect(route.iccid, username=route.iccid)))
    assert recv_all(s) == b"\x20\x02\x00\x05"  # only the source address counts by default


def test_default_trust_file_for_endpoints_without_ca(pki: Pki, world: World) -> None:
    pt = ProxyThread(proxy_config(pki, default_ca_file=str(pki.dir / "ca.crt")), world)
    try:
        route = replace(world.add(), ca_pem=None)
        pt.run(lambda: world.directory.put(route))
        s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
        assert s.recv(4) == b"\x20\x02\x00\x00"
    finally:
        pt.close()
    pt = ProxyThread(proxy_config(pki), world)  # system trust: the test CA is not in it
    try:
        s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
        assert recv_all(s) == b"\x20\x02\x00\x03"
    finally:
        pt.close()


@pytest.fixture
def password_broker(pki: Pki, tmp_path: Path) -> Iterator[tuple[Mosquitto, str]]:
    password = secrets.token_urlsafe(12)
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "gateway-user", password], check=True)
    pwfile.chmod(0o600)
    port = free_port()
    conf = "\n".join(
        [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous false",
            f"log_dest file {tmp_path / 'broker.log'}",
            "log_type all",
            f"password_file {pwfile}",
            f"listener {port} 127.0.0.1",
            f"cafile {pki.dir / 'ca.crt'}",
            f"certfile {pki.dir / 'broker.crt'}",
            f"keyfile {pki.dir / 'broker.key'}",
            "",
        ]
    )
    with run_mosquitto(conf, port, tmp_path) as b:
        yield b, password


def test_generic_mqtt_with_username_password(
    pki: Pki, password_broker: tuple[Mosquitto, str], clients: list[Client]
) -> None:
    broker, password = password_broker
    world = World(pki, broker.port)
    pt = ProxyThread(proxy_config(pki), world)
    try:
        route = replace(world.add(ready=False), endpoint_type=EndpointType.MQTT)
        # No client certificate at all: the stored user name and password replace the device's.
        world.keys.items[route.device] = KeyMaterial("", b"", username="gateway-user", password=password)
        pt.run(lambda: world.directory.put(route))
        dev = Client("d", bind=route.ip or "")
        dev.c.username_pw_set("device-user", "device-guess")
        clients.append(dev)
        assert dev.connect(pt.port) == 0
        assert dev.subscribe("t/1", 1) == [1]
        dev.publish("t/1", b"with stored password", 1)
        assert dev.expect().payload == b"with stored password"
        world.keys.items[route.device] = KeyMaterial("", b"", username="gateway-user", password="wrong")
        other = Client("d2", bind=route.ip or "")
        clients.append(other)
        assert other.connect(pt.port) == 0x87  # the broker's own refusal, relayed
        assert "not authorised" in (broker.conf.parent / "broker.log").read_text()
    finally:
        pt.close()
