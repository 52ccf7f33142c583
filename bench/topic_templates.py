"""CPU per message in the proxy with and without a topic template (issue 19).

One command, prints a table (not a test):

    python bench/topic_templates.py --devices 20 --seconds 5

Three relays, each in a fresh proxy process in front of the same local mosquitto (mutual TLS):

- ``bytes``: an MQTT broker Endpoint, no template: the plain byte relay (``proxy/pipe.py``);
- ``aws``: an AWS Endpoint, no template: the byte relay that diverts SUBSCRIBE/UNSUBSCRIBE and their
  acks to the subscription limits (``proxy/divert.py``); PUBLISH stays bytes;
- ``template``: an AWS Endpoint with ``fleet/{cloudId}/``: the same relay with PUBLISH taken out
  too and the prefix spliced into its bytes (MQTT 3.1.1 here, so no PUBLISH is decoded).

Every device floods PUBLISHes (64-byte payload, QoS 0 and QoS 1 with 8 in flight) for the given
time; a subscriber on the broker counts them. CPU per message is the proxy process's user+system
CPU over the phase divided by the messages the subscriber got. The load generator and broker share
the machine, so absolute rates depend on it; the ratio between the rows is the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from proxy_bench import (  # noqa: E402
    Conn,
    Device,
    MemoryKeys,
    Sink,
    broker_conf,
    cpu_seconds,
    flood,
    make_devices,
    tls_client,
)

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.model import EndpointType, ObjectRef  # noqa: E402
from cloudconnector.mqtt import codec  # noqa: E402
from cloudconnector.mqtt.packets import Subscribe, Subscription  # noqa: E402
from cloudconnector.routes import Route  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, run_mosquitto  # noqa: E402

MODES = ("bytes", "aws", "template")
TEMPLATE = "fleet/{cloudId}/"


def _proxy_child(
    mode: str, devices: list[Device], broker_port: int, ca_pem: str, port: int, ready: Any
) -> None:
    import logging

    import uvloop

    from cloudconnector.proxy.config import ProxyConfig
    from cloudconnector.proxy.directory import StaticDirectory
    from cloudconnector.proxy.server import Proxy

    logging.basicConfig(level=logging.WARNING)
    etype = EndpointType.MQTT if mode == "bytes" else EndpointType.AWS
    routes, keys = [], {}
    for i, dev in enumerate(devices):
        ref = ObjectRef("bench", f"dev{i}")
        route = Route(
            ref,
            f"{8935300000000000000 + i}",
            None,
            dev.ip,
            etype,
            "localhost",
            broker_port,
            ca_pem,
            dev.thing,
            "c1",
        )
        if mode == "template":
            route = replace(route, topic_prefix=TEMPLATE.replace("{cloudId}", dev.thing))
        routes.append(route)
        keys[ref] = KeyMaterial(dev.cert_pem, dev.key_pem)
    cfg = ProxyConfig(bind="127.0.0.1", mqtt_port=port, tls_port=None, http_port=None)

    async def main() -> None:
        proxy = Proxy(cfg, StaticDirectory(routes), MemoryKeys(keys))
        await proxy.start()
        ready.send(True)
        await asyncio.Event().wait()

    uvloop.run(main())


@contextlib.contextmanager
def run_proxy(mode: str, devices: list[Device], broker_port: int, ca_pem: str) -> Any:
    port = free_port()
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("fork").Process(
        target=_proxy_child, args=(mode, devices, broker_port, ca_pem, port, child), daemon=True
    )
    proc.start()
    parent.recv()
    try:
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.join(10)


async def phase(conns: list[Conn], topics: list[str], pid: int, sink: Sink, qos: int, seconds: float) -> str:
    sink.reset()
    await asyncio.sleep(0.3)
    cpu0 = cpu_seconds(pid)
    stop = time.monotonic() + seconds
    sent = [0]
    await asyncio.gather(*(flood(c, t, qos, stop, sent) for c, t in zip(conns, topics, strict=True)))
    await sink.settle()
    cpu = cpu_seconds(pid) - cpu0
    got = sink.count
    per = cpu / got * 1e6 if got else float("nan")
    return f"{got / seconds:>9.0f} msg/s  {per:>6.1f} µs CPU/msg  (sent {sent[0]}, got {got})"


async def bench_mode(
    mode: str, devices: list[Device], bport: int, ca: CA, sink: Sink, seconds: float
) -> list[str]:
    rows = []
    with run_proxy(mode, devices, bport, ca.cert_pem) as (pid, port):
        conns = []
        for dev in devices:
            c = Conn()
            await c.open(port, "firmware", bind=dev.ip, tls=None)
            conns.append(c)
        # Without a template each device names its own tree; with one, all send the same topic.
        topics = [f"{d.thing}/telemetry" if mode != "template" else "telemetry" for d in devices]
        for qos in (0, 1):
            rows.append(f"{mode:<9} QoS {qos}  {await phase(conns, topics, pid, sink, qos, seconds)}")
        for c in conns:
            await c.close()
    return rows


async def run(args: argparse.Namespace) -> list[str]:
    d = Path(tempfile.mkdtemp(prefix="topic-bench-"))
    try:
        ca = CA()
        (d / "ca.crt").write_text(ca.cert_pem)
        ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
        ca.issue("admin", client=True).write(d, "admin")
        devices = make_devices(ca, args.devices, d)
        bport = free_port()
        rows: list[str] = []
        with run_mosquitto(broker_conf(bport, d), bport, d):
            sink = Sink()
            sink_conn = Conn()
            await sink_conn.open(
                bport, "bench-sink", bind=None, tls=tls_client(d / "ca.crt", d / "admin.crt", d / "admin.key")
            )
            sink_conn.on_publish = sink
            sink_conn.writer.write(codec.encode(Subscribe(1, (Subscription("#", 1),))))
            await asyncio.sleep(0.2)
            for mode in args.modes.split(","):
                rows += await bench_mode(mode, devices, bport, ca, sink, args.seconds)
            await sink_conn.close()
        return rows
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each traffic phase")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    for row in asyncio.run(run(args)):
        print(row)


if __name__ == "__main__":
    main()
