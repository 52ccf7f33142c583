"""A source address or ICCID claimed by two Ready devices (two tenants) is served to neither: the
device gets CONNACK "not authorized", no key is read, nothing reaches the broker, the refusal is
logged and counted, and a live session of the first claimant ends when the second appears."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from cloudconnector.model import ObjectRef
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
from tests.support.procs import Mosquitto

NOT_AUTHORIZED = b"\x20\x02\x00\x05"


def refusals(pt: ProxyThread, result: str) -> float:
    text = pt.proxy.metrics.render().decode()
    line = f'cloudconnector_proxy_connections_total{{result="{result}"}} '
    found = [ln for ln in text.splitlines() if ln.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_shared_address_is_refused_to_both_tenants(
    world: World,
    proxy: ProxyThread,
    broker: Mosquitto,
    clients: list[Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = world.add("meter")
    dev = Client("d1", bind=first.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    assert dev.subscribe("t/1", 1) == [1]

    # Another tenant's Device claims the same address, written as IPv4-mapped IPv6.
    twin = replace(
        first, device=ObjectRef("tenant-b", "meter"), iccid="8935309999999999991", ip=f"::ffff:{first.ip}"
    )
    twin = replace(twin, client_id="tenant-b_meter")
    world.issue(twin)
    reads = world.keys.reads
    with caplog.at_level(logging.INFO, logger="cloudconnector"):
        proxy.run(lambda: world.directory.put(twin))
        dev.disconnects.get(timeout=10)  # the live session of the first claimant ends

        s = raw_connect(proxy.port, first.ip or "", codec.encode(Connect("whoever")))
        assert recv_all(s) == NOT_AUTHORIZED
        s.close()
    assert world.keys.reads == reads  # refused before any key was read
    assert refusals(proxy, "ambiguous_identity") == 1
    assert refusals(proxy, "unknown_device") == 0
    assert "tenant-b_meter" not in broker_log(broker)
    logged = caplog.text
    assert "claimed by several devices" in logged
    assert "fleet/meter" in logged and "tenant-b/meter" in logged

    # The other tenant's Device goes away: the address belongs to one device again.
    proxy.run(lambda: world.directory.remove(twin.device))
    s = raw_connect(proxy.port, first.ip or "", codec.encode(Connect("whoever")))
    assert s.recv(4) == b"\x20\x02\x00\x00"
    s.close()


def test_shared_iccid_is_refused_without_falling_back(pki: Pki, world: World) -> None:
    pt = ProxyThread(proxy_config(pki, identity=("client_id", "ip")), world)
    try:
        first = world.add("sim-a")
        twin = replace(
            world.add("sim-b", ready=False), device=ObjectRef("tenant-b", "sim-b"), iccid=first.iccid
        )
        pt.run(lambda: world.directory.put(twin))
        # The ICCID is ambiguous; the source address alone would name sim-a, but an ambiguous
        # identity is refused outright rather than tried the next way.
        s = raw_connect(pt.port, first.ip or "", codec.encode(Connect(first.iccid)))
        assert recv_all(s) == NOT_AUTHORIZED
        assert refusals(pt, "ambiguous_identity") == 1
    finally:
        pt.close()
