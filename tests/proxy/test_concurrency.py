"""Many devices at once: every message reaches the broker under its own device's certificate."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from tests.proxy.conftest import Client, ProxyThread, World, broker_log
from tests.support.procs import Mosquitto

DEVICES = 40
MESSAGES = 5


def test_each_device_reaches_the_broker_as_itself(
    world: World, proxy: ProxyThread, admin: Client, broker: Mosquitto, clients: list[Client]
) -> None:
    routes = [world.add() for _ in range(DEVICES)]
    things = [r.client_id for r in routes]
    for thing in things:
        admin.subscribe(f"{thing}/#", 1)
    # Every device claims the same client id: the proxy must still present each one separately.
    devices = [Client("same-client-id", bind=r.ip or "") for r in routes]
    clients.extend(devices)

    def run(i: int) -> None:
        dev = devices[i]
        assert dev.connect(proxy.port) == 0
        for n in range(MESSAGES):
            dev.publish(f"{things[i]}/up", b"%d:%d" % (i, n), 1)
            # Impersonation attempt: under the broker's ACL only the topic owner may write here.
            dev.publish(f"{things[(i + 1) % DEVICES]}/up", b"forged %d:%d" % (i, n), 1)

    with ThreadPoolExecutor(DEVICES) as pool:
        list(pool.map(run, range(DEVICES)))

    got: dict[str, set[bytes]] = {t: set() for t in things}
    for _ in range(DEVICES * MESSAGES):
        msg = admin.expect()
        got[msg.topic.split("/")[0]].add(msg.payload)
    assert admin.nothing()  # in particular no forged message
    for i, thing in enumerate(things):
        assert got[thing] == {b"%d:%d" % (i, n) for n in range(MESSAGES)}

    # The broker saw each connection with client id == certificate identity (its user name).
    seen = dict(re.findall(r" as (\S+) \(p\d, c\d, k\d+, u'([^']+)'\)", broker_log(broker)))
    for thing in things:
        assert seen.get(thing) == thing
    for dev in devices:
        assert dev.disconnects.empty()  # nobody was evicted by a duplicate client id
