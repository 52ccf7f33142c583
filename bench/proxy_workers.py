"""The proxy on 1 and on N worker processes (proxy/workers.py): connect rate and message throughput.

One command, prints a table (not a test):

    python bench/proxy_workers.py --devices 500 --seconds 3 --workers 1,2

The load, the broker and the measurements are bench/proxy_bench.py's (each device its own
certificate and 127.x address, a local mosquitto with mutual TLS, connection set-up, paced and
maximum-rate phases at QoS 0 and 1). What differs is the proxy: credentials come from the embedded
key store (an encrypted SQLite file, as ``cloud-connector run`` keeps them), and with N > 1 it runs
as the parent that holds the directory plus N workers on one port, exactly as
``cloud-connector run --workers N`` does. CPU and memory are summed over the parent and its
workers. On a machine with C cores the load generator and the broker compete with the workers for
them, so read the scaling against the "direct mTLS" column (the generator's own limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import proxy_bench as pb  # noqa: E402

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.keystore.embedded import EmbeddedKeyStore  # noqa: E402
from cloudconnector.model import EndpointType, ObjectRef  # noqa: E402
from cloudconnector.routes import Route  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, run_mosquitto  # noqa: E402


def _tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


_cpu, _rss = pb.cpu_seconds, pb.rss_kib
pb.cpu_seconds = lambda pid: sum(_cpu(p) for p in _tree(pid))  # type: ignore[assignment]
pb.rss_kib = lambda pid: sum(_rss(p) for p in _tree(pid))  # type: ignore[assignment]


def _routes(devices: list[pb.Device], broker_port: int, ca_pem: str) -> list[Route]:
    return [
        Route(
            ObjectRef("bench", f"dev{i}"),
            f"{8935300000000000000 + i}",
            None,
            dev.ip,
            EndpointType.AWS,
            "localhost",
            broker_port,
            ca_pem,
            dev.thing,
            "c1",
        )
        for i, dev in enumerate(devices)
    ]


def _serve(state: str, routes: list[Route], port: int, workers: int, ready: Any) -> None:
    import uvloop

    from cloudconnector.proxy.config import ProxyConfig
    from cloudconnector.proxy.directory import StaticDirectory
    from cloudconnector.proxy.server import Proxy
    from cloudconnector.proxy.workers import PublishingDirectory, WorkerPool
    from cloudconnector.standalone.keys import open_key_stores

    cfg = ProxyConfig(
        bind="127.0.0.1",
        mqtt_port=port,
        tls_port=None,
        http_port=None,
        max_connections=100_000,
        connection_status=False,
        log_json=False,
        drain_seconds=0,
        workers=workers,
    )

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        if workers == 1:  # the single process cloud-connector run keeps for --workers 1
            keys = open_key_stores(Path(state))
            proxy = Proxy(cfg, StaticDirectory(routes), keys.reader)
            await proxy.start()
            ready.send(True)
            await stop.wait()
            await proxy.stop(0)
            return
        pool = WorkerPool(cfg, workers, PublishingDirectory(routes), state, None, "bench")
        await pool.start()
        ready.send(True)
        await stop.wait()
        await pool.stop()

    uvloop.run(main())


@contextlib.contextmanager
def run_proxy(state: Path, routes: list[Route], workers: int) -> Any:
    port = free_port()
    parent, child = multiprocessing.Pipe()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as in production
    proc = ctx.Process(target=_serve, args=(str(state), routes, port, workers, child))
    proc.start()
    parent.recv()
    try:
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.join(30)


async def run_all(args: argparse.Namespace) -> list[pb.Result]:
    d = Path(tempfile.mkdtemp(prefix="proxy-workers-"))
    try:
        ca = CA()
        ca_file = d / "ca.crt"
        ca_file.write_text(ca.cert_pem)
        ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
        ca.issue("admin", client=True).write(d, "admin")
        print(f"making {args.devices} device certificates...", file=sys.stderr)
        devices = pb.make_devices(ca, args.devices, d)
        state = d / "state"
        state.mkdir()
        store = EmbeddedKeyStore.open(state / "keys.db", state / "master.key", {})
        for i, dev in enumerate(devices):
            await store.put(ObjectRef("bench", f"dev{i}"), KeyMaterial(dev.cert_pem, dev.key_pem), {})
        store.close()
        bport = free_port()
        results = []
        with run_mosquitto(pb.broker_conf(bport, d), bport, d) as broker:
            args.broker_pid = broker.proc.pid
            sink = pb.Sink()
            sink_conn = pb.Conn()
            admin_tls = pb.tls_client(ca_file, d / "admin.crt", d / "admin.key")
            await sink_conn.open(bport, "bench-sink", bind=None, tls=admin_tls)
            sink_conn.on_publish = sink
            sink_conn.writer.write(pb.codec.encode(pb.Subscribe(1, (pb.Subscription("#", 1),))))
            await asyncio.sleep(0.2)
            if args.direct:
                print("direct...", file=sys.stderr)

                def client_tls(dev: pb.Device) -> Any:
                    return pb.tls_client(ca_file, dev.cert, dev.key)

                results.append(
                    await pb.bench_path(
                        "direct mTLS", devices, bport, None, client_tls, sink_conn, sink, args
                    )
                )
            routes = _routes(devices, bport, ca.cert_pem)
            for n in (int(x) for x in args.workers.split(",")):
                print(f"proxy, {n} worker(s)...", file=sys.stderr)
                with run_proxy(state, routes, n) as (pid, port):
                    name = f"proxy x{n}"
                    results.append(await pb.bench_path(name, devices, port, pid, None, sink_conn, sink, args))
            await sink_conn.close()
        return results
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each traffic phase")
    p.add_argument("--interval", type=float, default=1.0, help="paced: seconds between a device's messages")
    p.add_argument("--parallel", type=int, default=50, help="connections being set up at once")
    p.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated")
    p.add_argument("--direct", action="store_true", help="also the same load without a proxy")
    args = p.parse_args()
    import os
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    results = uvloop.run(run_all(args))
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.rows if k not in keys]
    width = max(len(k) for k in keys) + 2
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.devices} devices, {args.seconds:g} s per phase; load average {load}")
    print("".ljust(width) + "".join(r.path.rjust(16) for r in results))
    for k in keys:
        print(k.ljust(width) + "".join(r.rows.get(k, "-").rjust(16) for r in results))


if __name__ == "__main__":
    main()
