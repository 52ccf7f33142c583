"""Benchmark: live connection status on a real API server, within its write budget.

One command, prints results (not a test):

    .venv/bin/python bench/connection_status.py [--devices 2000] [--rate 20] [--interval 60] [--seconds 150]

A real kube-apiserver with etcd (../shared/k8s/start, as the tests use) holds N Devices. The
proxy's own writer (``cloudconnector.proxy.presence.Presence`` with ``KubePresenceSink``, the code
``cloud-connector-proxy`` runs) then sees all N devices connect at once (a connect storm after a
proxy restart), every device sending a message every few seconds, and after a while a tenth of them
disconnecting. Reported: status writes per second against the cap, the largest number of writes
any one device got per minute, how long until every connect was visible, the API server's CPU per
status write, and the writer's own CPU. Sessions are simulated in-process (the byte relay's hand-
over is the same ``Session.add``); what is measured is the API-server side of the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudconnector.kube.client import KubeClient
from cloudconnector.kube.config import KubeConfig
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.kube_presence import KubePresenceSink
from cloudconnector.proxy.presence import ConnectionStatus, Presence
from tests.support.kube import Kube, real_cluster


class CountingSink(KubePresenceSink):
    """The real sink, with each write's time and device remembered for the report."""

    def __init__(self, client: KubeClient) -> None:
        super().__init__(client)
        self.log: list[tuple[float, ObjectRef]] = []

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        await super().write(device, status)
        self.log.append((time.monotonic(), device))

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        done = await super().write_ended(device, status, proxy)
        self.log.append((time.monotonic(), device))
        return done


def create_devices(kube: Kube, ns: str, n: int) -> None:
    def one(i: int) -> None:
        kube.create(
            {
                "apiVersion": "cloudconnector.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": f"d{i:05d}", "namespace": ns},
                "spec": {
                    "group": "meters",
                    "sim": {"iccid": f"89353{i:014d}"},
                    "ip": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}",
                },
            }
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


def apiserver_cpu(kube: Kube) -> float:
    pid = int((kube.kubeconfig.parent / "apiserver.pid").read_text())
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(kube: Kube, args: argparse.Namespace) -> None:
    ns = kube.namespace("bench")
    started = time.monotonic()
    await asyncio.to_thread(create_devices, kube, ns, args.devices)
    print(f"created {args.devices} Devices in {time.monotonic() - started:.1f} s")
    client = KubeClient(KubeConfig.from_kubeconfig(kube.kubeconfig))
    sink = CountingSink(client)
    presence = Presence(sink, "bench-proxy-0", interval=args.interval, rate=args.rate)
    cpu0, api0, t0 = resource.getrusage(resource.RUSAGE_SELF), apiserver_cpu(kube), time.monotonic()
    writer = asyncio.create_task(presence.run())
    refs = [ObjectRef(ns, f"d{i:05d}") for i in range(args.devices)]
    sessions = [presence.opened(ref, 4, device_tls=False) for ref in refs]  # the storm
    all_connects_at = None
    deadline = t0 + args.seconds
    tick = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        tick += 1
        now = time.time()
        for i, session in enumerate(sessions):
            if (i + tick) % 5 == 0 and not session.ended:  # each device: a message every 5 s
                session.add(True, 1, 120, now)
                session.wire_bytes += 180
        if tick == args.seconds // 2:
            for session in sessions[: len(sessions) // 10]:
                presence.closed(session)
        if all_connects_at is None and len({d for _, d in sink.log}) >= args.devices:
            all_connects_at = time.monotonic() - t0
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    elapsed = time.monotonic() - t0
    cpu1, api1 = resource.getrusage(resource.RUSAGE_SELF), apiserver_cpu(kube)
    await client.aclose()

    writes = len(sink.log)
    per_minute: Counter[tuple[ObjectRef, int]] = Counter((d, int((t - t0) // 60)) for t, d in sink.log)
    busiest = max(per_minute.values()) if per_minute else 0
    per_second = Counter(int(t - t0) for t, _ in sink.log)
    sample = kube.get("Device", ns, "d00000")["status"]["connection"]
    print(f"configuration: {args.devices} Devices, rate cap {args.rate}/s, interval {args.interval:g} s,")
    print("  one proxy's writer (Presence + KubePresenceSink) against kube-apiserver v1.25 with etcd")
    print(f"run: {elapsed:.0f} s; status writes: {writes} ({writes / elapsed:.1f}/s on average)")
    print(f"  busiest second: {max(per_second.values())} writes (cap {args.rate:g}/s, one tick's bucket)")
    print(f"  most writes for one device in one minute: {busiest} (budget: 1 refresh + connect/disconnect)")
    if all_connects_at is None:
        seen = len({d for _, d in sink.log})
        print(
            f"  connects visible: {seen} of {args.devices} within the run"
            f" (N / cap = {args.devices / args.rate:.0f} s)"
        )
    else:
        print(
            f"  every connect visible after {all_connects_at:.0f} s"
            f" (N / cap = {args.devices / args.rate:.0f} s)"
        )
    print(f"  API server CPU: {api1 - api0:.1f} s, {1000 * (api1 - api0) / max(writes, 1):.2f} ms per write")
    own = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    print(f"  this process (writer + simulated traffic): {own:.1f} s CPU")
    print(f"  a Device's status.connection: {sample}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--interval", type=float, default=60.0)
    p.add_argument("--seconds", type=int, default=150)
    args = p.parse_args()
    with real_cluster() as kube:
        asyncio.run(run(kube, args))


if __name__ == "__main__":
    main()
