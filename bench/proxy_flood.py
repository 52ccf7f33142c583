"""Pre-identification flood: many connections from addresses no device has, each sending a huge
CONNECT but its last byte, while one good device keeps publishing through the same proxy.

One command, prints a report (not a test)::

    python bench/proxy_flood.py                          # 10,000 flood connections (issue 18)
    python bench/proxy_flood.py --connections 500        # smoke size
    python bench/proxy_flood.py --identity client_id     # no refusal by address: the CONNECT cap
    python bench/proxy_flood.py --connect-size 16000     # CONNECTs under the cap: the shared budget

The proxy runs as its own process (uvloop, as in production) in front of a real mosquitto with
mutual TLS. The good device connects from its own address and sends QoS 1 PUBLISHes every
``--interval`` seconds, timing each PUBACK (device -> proxy -> broker and back): first for
``--seconds`` with no flood (the baseline), then while ``--connections`` flood connections are
opened, ``--parallel`` at a time. Each flood connection announces ``--connect-size`` bytes of
CONNECT, sends all but the last, and stays open until the proxy closes it. Reported: the proxy's
RSS before, its peak (VmHWM) and after, the good device's round-trip p50/p99/max without and with
the flood, how the flood connections ended, and the proxy's own counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from load import peak_rss_kib, raise_nofile  # noqa: E402
from proxy_bench import Conn, MemoryKeys, broker_conf, make_devices, pct, rss_kib  # noqa: E402

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.model import EndpointType, ObjectRef  # noqa: E402
from cloudconnector.mqtt import codec  # noqa: E402
from cloudconnector.mqtt.packets import Publish  # noqa: E402
from cloudconnector.mqtt.wire import encode_string, encode_varint  # noqa: E402
from cloudconnector.routes import Route  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, run_mosquitto  # noqa: E402


def flood_ip(i: int) -> str:
    """Addresses no device has (devices are on 127.10.0.0 and up, see proxy_bench.device_ip)."""
    return f"127.{200 + i // 60000}.{(i // 250) % 240 + 1}.{i % 250 + 2}"


def _proxy_child(
    route: Route, key: KeyMaterial, port: int, http_port: int, identity: str, ready: Any
) -> None:
    import uvloop

    from cloudconnector.proxy.config import ProxyConfig
    from cloudconnector.proxy.directory import StaticDirectory
    from cloudconnector.proxy.health import make_app, start_http
    from cloudconnector.proxy.server import Proxy

    logging.basicConfig(level=logging.WARNING)  # a refusal per flood connection would be logged at INFO
    cfg = ProxyConfig(
        bind="127.0.0.1",
        mqtt_port=port,
        tls_port=None,
        http_bind="127.0.0.1",
        http_port=http_port,
        identity=(identity,),
        max_connections=100_000,
        log_json=False,
    )

    async def main() -> None:
        proxy = Proxy(cfg, StaticDirectory([route]), MemoryKeys({route.device: key}))
        runner, _ = await start_http(make_app(proxy.metrics, lambda: proxy.accepting), "127.0.0.1", http_port)
        await proxy.start()
        ready.send(True)
        await asyncio.Event().wait()  # until terminated
        await runner.cleanup()

    uvloop.run(main())


def proxy_counters(http_port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cloudconnector_proxy_connections_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('"')[1]] = float(value)
    return out


def flood_bytes(size: int) -> bytes:
    """A CONNECT announcing ``size`` body bytes, all sent but the last."""
    start = encode_string("MQTT") + bytes((4, 0x02)) + b"\x00\x3c"
    return b"\x10" + encode_varint(size) + (start + b"\x00" * size)[: size - 1]


async def flood_one(i: int, port: int, data: bytes, ends: dict[str, int], hold: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(flood_ip(i), 0))
    except OSError:
        ends["connect failed"] = ends.get("connect failed", 0) + 1
        return
    how = "held until the end"
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(16), hold)
            how = "answered, then closed" if answer else "closed"
        except TimeoutError:
            pass
    except ConnectionError:
        how = "reset"
    finally:
        writer.transport.abort()
    ends[how] = ends.get(how, 0) + 1


def flood_process(args: argparse.Namespace, port: int, result: Any) -> None:
    """The flood, in a process of its own so that its sending never delays the probe's loop."""

    async def main() -> dict[str, int]:
        data = flood_bytes(args.connect_size)
        ends: dict[str, int] = {}
        gate = asyncio.Semaphore(args.parallel)

        async def one(i: int) -> None:
            async with gate:
                await flood_one(i, port, data, ends, args.hold)

        await asyncio.gather(*(one(i) for i in range(args.connections)))
        return ends

    result.send(asyncio.run(main()))


async def probe(dev: Conn, topic: str, seconds: float, interval: float, rtts: list[int]) -> None:
    """QoS 1 round trips on a fixed grid, each waiting for its PUBACK (10 s at most)."""
    start = time.monotonic()
    n = 0
    while (due := start + n * interval) < start + seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        pid = dev.pid()
        sent = time.perf_counter_ns()
        dev.writer.write(codec.encode(Publish(topic, b"probe", 1, packet_id=pid)))
        while await asyncio.wait_for(dev.acks.get(), 10) != pid:
            pass
        rtts.append(time.perf_counter_ns() - sent)
        n += 1


def summary(rtts: list[int]) -> dict[str, float]:
    ms = [r / 1e6 for r in rtts]
    return {
        "n": len(ms),
        "p50 ms": round(pct(rtts, 0.50), 2),
        "p99 ms": round(pct(rtts, 0.99), 2),
        "max ms": round(max(ms, default=0.0), 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="proxy-flood-"))
    ca = CA()
    (d / "ca.crt").write_text(ca.cert_pem)
    ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
    (dev,) = make_devices(ca, 1, d)
    broker_port, port, http_port = free_port(), free_port(), free_port()
    route = Route(
        ObjectRef("bench", "good"), "8935300000000000001", None, dev.ip, EndpointType.AWS,
        "localhost", broker_port, ca.cert_pem, dev.thing, "c1",
    )  # fmt: skip
    report: dict[str, Any] = {"connections": args.connections, "identity": args.identity}
    report["CONNECT announced bytes"] = args.connect_size
    with run_mosquitto(broker_conf(broker_port, d), broker_port):
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(
            target=_proxy_child,
            args=(route, KeyMaterial(dev.cert_pem, dev.key_pem), port, http_port, args.identity, child),
            daemon=True,
        )
        proc.start()
        parent.recv()
        pid = proc.pid
        assert pid is not None
        try:
            good = Conn()
            client_id = route.iccid if args.identity == "client_id" else dev.thing  # (the ICCID identifies)
            await good.open(port, client_id, bind=dev.ip, tls=None)
            topic = f"{dev.thing}/probe"
            quiet: list[int] = []
            await probe(good, topic, args.seconds, args.interval, quiet)
            report["proxy RSS before MiB"] = round(rss_kib(pid) / 1024, 1)
            flooded: list[int] = []
            started = time.monotonic()
            ends_in, ends_out = multiprocessing.Pipe()
            flooder = multiprocessing.get_context("spawn").Process(
                target=flood_process, args=(args, port, ends_out), daemon=True
            )
            flooder.start()
            await probe(good, topic, args.seconds, args.interval, flooded)
            while not ends_in.poll():  # the device keeps probing until the flood is through
                await probe(good, topic, 1.0, args.interval, flooded)
            report["flood seconds"] = round(time.monotonic() - started, 1)
            report["flood connections ended"] = dict(sorted(ends_in.recv().items()))
            flooder.join(10)
            report["good device without flood"] = summary(quiet)
            report["good device during flood"] = summary(flooded)
            report["proxy RSS peak (VmHWM) MiB"] = round(peak_rss_kib(pid) / 1024, 1)
            await asyncio.sleep(1.0)
            report["proxy RSS after MiB"] = round(rss_kib(pid) / 1024, 1)
            report["proxy connection results"] = proxy_counters(http_port)
            await good.close()
        finally:
            proc.terminate()
            proc.join(10)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000, help="flood connections (default 10000)")
    p.add_argument("--parallel", type=int, default=1000, help="flood connections open at once")
    p.add_argument("--connect-size", type=int, default=262_144, help="CONNECT body bytes announced")
    p.add_argument("--identity", choices=("ip", "client_id"), default="ip", help="the proxy's identity mode")
    p.add_argument("--seconds", type=float, default=5.0, help="baseline probing time")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between probe messages")
    p.add_argument("--hold", type=float, default=15.0, help="longest a flood connection waits to be closed")
    p.add_argument("--json", metavar="FILE", help="also write the report here")
    args = p.parse_args()
    raise_nofile(2 * args.parallel + 256)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
