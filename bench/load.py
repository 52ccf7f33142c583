"""Load benchmark: thousands of concurrent devices through one proxy process, steady traffic.

One command, prints a report (not a test)::

    python bench/load.py --devices 5000 --seconds 60     # full size (issue 7, item 4)
    python bench/load.py --devices 500 --seconds 10      # quick size

Everything is real and on loopback: mosquitto with mutual TLS (identity from the client
certificate), per-device EC keys and certificates signed by a CA made at run time, the keys stored
encrypted in the embedded key store (SQLite) and fetched per session by the proxy through its
``KeyReader``, and the proxy as its own process (``--serve-proxy``: the cluster entry point needs
Kubernetes, so this file doubles as a small launcher that builds ``Proxy`` with a
``StaticDirectory``). Each device connects from its own 127.x address; the proxy finds it by
source address, opens its own mutual-TLS session to the broker and relays.

Phases: connect all devices (``--parallel`` set-ups at once), then ``--seconds`` of QoS 1 and
``--seconds`` of QoS 0 traffic, each device publishing one 64-byte message every ``--interval``
seconds (start times spread evenly; at QoS 1 a device waits for its PUBACK before the next).
A subscriber on the broker counts messages by unique (phase, device, sequence) ids, so loss and
duplicates are exact; the payload carries the send time for end-to-end latency. It reports the
proxy process's CPU seconds and share of one core, RSS (baseline, idle with all connected, peak
VmHWM) and RSS per connection, the connection set-up rate, messages sent/acknowledged/received,
loss (must be 0 at QoS 1) and latency p50/p99, and the proxy's garbage-collection pauses.
Bounded: every wait has a limit, the run stops by itself, and ``--json FILE`` also writes the
figures for the record.

``--path direct`` runs the same devices and traffic straight to the broker (the baseline for
latency); ``--gc-freeze`` calls ``gc.freeze()`` in the proxy once every device is connected.
Recorded runs and what they mean: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from proxy_bench import (  # noqa: E402
    Conn,
    Device,
    broker_conf,
    cpu_seconds,
    make_devices,
    pct,
    rss_kib,
    tls_client,
)

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.keystore.embedded import EmbeddedKeyStore  # noqa: E402
from cloudconnector.model import EndpointType, ObjectRef  # noqa: E402
from cloudconnector.mqtt import codec  # noqa: E402
from cloudconnector.mqtt.packets import Publish, Subscribe, Subscription  # noqa: E402
from cloudconnector.routes import Route  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, run_mosquitto  # noqa: E402

PAYLOAD = 64
NAMESPACE = "load"
# phase byte, device index, sequence number, send time (monotonic ns): the rest is padding
STAMP = struct.Struct("!BIIq")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def raise_nofile(need: int) -> int:
    """Lift the soft open-files limit to the hard one (children inherit it); refuse if too low."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        sys.exit(f"load: the open-files hard limit is {hard}, {need} are needed (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------- the proxy process


def serve_proxy(workdir: Path, port: int, http_port: int) -> None:
    """The launcher: the proxy with the routes in ``routes.json`` and keys from the embedded store."""
    import uvloop

    from cloudconnector.proxy.config import ProxyConfig
    from cloudconnector.proxy.directory import StaticDirectory
    from cloudconnector.proxy.server import Proxy

    logging.basicConfig(level=logging.WARNING, format="proxy %(levelname)s %(name)s: %(message)s")
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    spec = json.loads((workdir / "routes.json").read_text())
    routes = [
        Route(
            ObjectRef(NAMESPACE, r["name"]),
            r["iccid"],
            None,
            r["ip"],
            EndpointType.MQTT,
            "localhost",
            spec["broker_port"],
            spec["ca_pem"],
            r["client_id"],
            "c1",
        )
        for r in spec["routes"]
    ]
    # The proxy's read-only role on the store; the master key file was made by the parent.
    keys = EmbeddedKeyStore.open(workdir / "keys.db", workdir / "master.key").reader()
    cfg = ProxyConfig(
        bind="127.0.0.1",
        mqtt_port=port,
        tls_port=None,
        http_bind="127.0.0.1",
        http_port=http_port,
        max_connections=100_000,
        log_json=False,
    )

    async def main() -> None:
        from cloudconnector.proxy.health import make_app, start_http

        proxy = Proxy(cfg, StaticDirectory(routes), keys)
        runner, _ = await start_http(make_app(proxy.metrics, lambda: proxy.accepting), "127.0.0.1", http_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # --gc-freeze: the parent signals once every session is set up; the collector then no
        # longer walks the long-lived session objects on each full collection.
        loop.add_signal_handler(signal.SIGUSR1, gc.freeze)
        loop.add_signal_handler(signal.SIGUSR2, pauses.mark)
        trace_out = os.environ.get("CC_BENCH_TRACEMALLOC")  # profiling: heap diff, empty -> idle
        if trace_out:
            import tracemalloc

            tracemalloc.start(int(os.environ.get("CC_BENCH_TRACEMALLOC_FRAMES", "1")))
            empty = tracemalloc.take_snapshot()

            def heap_diff() -> None:
                pauses.mark()
                gc.collect()
                diff = tracemalloc.take_snapshot().compare_to(empty, "traceback")
                top = ("\n".join(d.traceback.format()) + f"\n{d}" for d in diff[:40])
                Path(trace_out).write_text("\n\n".join(top))

            loop.add_signal_handler(signal.SIGUSR2, heap_diff)
        profile_out = os.environ.get("CC_BENCH_CPROFILE")  # profiling: where set-up CPU goes
        if profile_out:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()

            def dump_profile() -> None:
                pauses.mark()
                profiler.disable()
                profiler.dump_stats(profile_out)

            loop.add_signal_handler(signal.SIGUSR2, dump_profile)
        await proxy.start()
        print("ready", flush=True)
        await stop.wait()
        # Written before the sessions end: the pauses of the run itself, not of the shutdown.
        (workdir / "gc.json").write_text(json.dumps(pauses.summary()))
        await proxy.stop(drain_seconds=0)
        await runner.cleanup()

    uvloop.run(main())


class GcPauses:
    """Times the cyclic collector in the proxy process: a full collection over thousands of
    sessions stops the event loop, which shows up as a latency tail for every device at once."""

    def __init__(self) -> None:
        self.started = 0
        self.part = "set-up"
        self.pauses: dict[tuple[str, int], list[int]] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter_ns()
        else:
            key = (self.part, info["generation"])
            self.pauses.setdefault(key, []).append(time.perf_counter_ns() - self.started)

    def mark(self) -> None:
        """The parent's signal that every device is connected: later pauses hit traffic."""
        self.part = "traffic"

    def summary(self) -> dict[str, Any]:
        return {
            f"{part} gen{g}": {
                "count": len(p),
                "total ms": round(sum(p) / 1e6, 1),
                "max ms": round(max(p, default=0) / 1e6, 1),
            }
            for (part, g), p in sorted(self.pauses.items())
        }


@contextlib.contextmanager
def run_proxy(workdir: Path) -> Any:
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, __file__, "--serve-proxy", str(workdir), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--http-port", str(http_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the launcher prints "ready" once it listens
        if line.strip() != "ready":
            raise RuntimeError(f"the proxy did not start (exit {proc.poll()})")
        yield proc.pid, port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def proxy_metrics(http_port: int) -> dict[str, float]:
    """The proxy's own counters, summed over labels (a cross-check of the generator's counts)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name.split("{", 1)[0]] = out.get(name.split("{", 1)[0], 0.0) + float(value)
    return out


# ---------------------------------------------------------------- generator and subscriber


class Subscriber:
    """Counts messages at the broker by unique id and keeps their end-to-end latency."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int, int]] = set()
        self.duplicates = 0
        self.samples: list[tuple[int, int]] = []  # (send time, latency) in ns
        self.last = time.monotonic()

    def __call__(self, p: Publish) -> None:
        now = time.monotonic_ns()
        self.last = time.monotonic()
        phase, dev, seq, sent = STAMP.unpack_from(p.payload)
        key = (phase, dev, seq)
        if key in self.seen:
            self.duplicates += 1  # QoS 1 allows them; they are reported, not counted as received
            return
        self.seen.add(key)
        self.samples.append((sent, now - sent))

    def count(self, phase: int) -> int:
        return sum(1 for k in self.seen if k[0] == phase)

    async def settle(self, quiet: float = 1.0, limit: float = 60.0) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            await asyncio.sleep(quiet)
            if time.monotonic() - self.last >= quiet:
                return


@dataclass
class Traffic:
    sent: set[tuple[int, int, int]] = field(default_factory=set)
    acked: int = 0
    ack_timeouts: int = 0
    send_errors: int = 0


async def device_traffic(
    c: Conn, index: int, topic: str, phase: int, qos: int, stop: float, args: argparse.Namespace, t: Traffic
) -> None:
    await asyncio.sleep(args.interval * index / args.devices)  # spread evenly over one interval
    seq = 0
    next_at = time.monotonic()
    while time.monotonic() < stop:
        seq += 1
        payload = STAMP.pack(phase, index, seq, time.monotonic_ns()).ljust(PAYLOAD, b".")
        try:
            c.writer.write(codec.encode(Publish(topic, payload, qos, packet_id=c.pid() if qos else None)))
        except (ConnectionError, RuntimeError):
            t.send_errors += 1
            return
        t.sent.add((phase, index, seq))
        if qos:
            try:
                await asyncio.wait_for(c.acks.get(), args.ack_timeout)
                t.acked += 1
            except TimeoutError:
                t.ack_timeouts += 1
                return
        next_at += args.interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


# ---------------------------------------------------------------- the run


async def store_keys(devices: list[Device], workdir: Path) -> float:
    store = EmbeddedKeyStore.open(workdir / "keys.db", workdir / "master.key")
    sem = asyncio.Semaphore(8)
    t0 = time.perf_counter()

    async def put(i: int, dev: Device) -> None:
        async with sem:
            await store.put(ObjectRef(NAMESPACE, f"dev{i}"), KeyMaterial(dev.cert_pem, dev.key_pem), {})

    await asyncio.gather(*(put(i, d) for i, d in enumerate(devices)))
    return time.perf_counter() - t0


def write_routes(devices: list[Device], ca_pem: str, broker_port: int, workdir: Path) -> None:
    routes = [
        {"name": f"dev{i}", "iccid": f"{8935400000000000000 + i}", "ip": d.ip, "client_id": d.thing}
        for i, d in enumerate(devices)
    ]
    spec = {"broker_port": broker_port, "ca_pem": ca_pem, "routes": routes}
    (workdir / "routes.json").write_text(json.dumps(spec))


async def run(args: argparse.Namespace, report: dict[str, Any]) -> None:
    d = Path(tempfile.mkdtemp(prefix="load-bench-"))
    try:
        ca = CA()
        (d / "ca.crt").write_text(ca.cert_pem)
        ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
        ca.issue("load-subscriber", client=True).write(d, "subscriber")
        t0 = time.perf_counter()
        devices = make_devices(ca, args.devices, d)
        log(f"{args.devices} device keys and certificates in {time.perf_counter() - t0:.1f} s")
        took = await store_keys(devices, d)
        log(f"stored in the embedded key store in {took:.1f} s")
        bport = free_port()
        write_routes(devices, ca.cert_pem, bport, d)
        with run_mosquitto(broker_conf(bport, d), bport, d) as broker:
            sub = Subscriber()
            sink = Conn()
            await sink.open(bport, "load-subscriber", bind=None, tls=tls_client(d / "ca.crt", *_pair(d)))
            sink.on_publish = sub
            sink.writer.write(codec.encode(Subscribe(1, (Subscription("load/#", 1),))))
            await asyncio.sleep(0.3)
            cpus = {"broker": broker.proc.pid, "generator": os.getpid()}
            if args.path == "direct":
                # The baseline: the same devices and traffic straight to the broker with their own
                # certificates, to tell the proxy's share of a latency tail from the rest's.
                ca_file = d / "ca.crt"
                target = Target(None, bport, None, lambda dev: tls_client(ca_file, dev.cert, dev.key))
                await drive(args, devices, target, cpus, sub, report)
            else:
                with run_proxy(d) as (pid, port, http_port):
                    await drive(args, devices, Target(pid, port, http_port, None), cpus, sub, report)
                with contextlib.suppress(OSError, ValueError):
                    report["proxy GC pauses"] = json.loads((d / "gc.json").read_text())
            await sink.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _pair(d: Path) -> tuple[Path, Path]:
    return d / "subscriber.crt", d / "subscriber.key"


@dataclass(frozen=True)
class Target:
    """Where the devices connect: the proxy (pid, ports) or the broker itself (TLS per device)."""

    pid: int | None
    port: int
    http_port: int | None
    tls_for: Callable[[Device], ssl.SSLContext] | None


async def drive(
    args: argparse.Namespace,
    devices: list[Device],
    target: Target,
    others: dict[str, int],
    sub: Subscriber,
    report: dict[str, Any],
) -> None:
    pid, port = target.pid, target.port
    base_rss = rss_kib(pid) if pid else 0
    cpu_start = cpu_seconds(pid) if pid else 0.0
    others_start = {name: cpu_seconds(p) for name, p in others.items()}
    run_start = time.monotonic()
    if pid:
        report["proxy RSS baseline MiB"] = round(base_rss / 1024, 1)

    conns: dict[int, Conn] = {}
    failures: list[str] = []
    sem = asyncio.Semaphore(args.parallel)

    async def connect(i: int, dev: Device) -> None:
        async with sem:
            c = Conn()
            try:
                tls = target.tls_for(dev) if target.tls_for else None
                bind = None if tls else dev.ip  # direct: the certificate is the identity
                await asyncio.wait_for(c.open(port, dev.thing, bind=bind, tls=tls), args.ack_timeout)
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as e:
                failures.append(type(e).__name__)
                return
            conns[i] = c

    log(f"connecting {args.devices} devices ({args.path})...")
    t0 = time.perf_counter()
    await asyncio.gather(*(connect(i, dev) for i, dev in enumerate(devices)))
    setup = time.perf_counter() - t0
    report["connected"] = f"{len(conns)}/{args.devices}"
    report["connect failures"] = len(failures)
    report["connection set-up /s"] = round(len(conns) / setup)
    if pid:
        cpu_setup = cpu_seconds(pid) - cpu_start
        await asyncio.sleep(2.0)  # let the proxy's allocations settle before reading idle memory
        idle_rss = rss_kib(pid)
        report["proxy CPU ms per connection"] = round(cpu_setup * 1000 / max(1, len(conns)), 2)
        report["proxy RSS idle MiB"] = round(idle_rss / 1024, 1)
        report["proxy KiB per connection"] = round((idle_rss - base_rss) / max(1, len(conns)), 1)
    else:
        await asyncio.sleep(2.0)
    log(f"connected {len(conns)} in {setup:.1f} s ({len(failures)} failed)")
    if pid:
        os.kill(pid, signal.SIGUSR2)
    if pid and args.gc_freeze:
        os.kill(pid, signal.SIGUSR1)
        report["proxy gc.freeze() after set-up"] = "yes"

    for phase, qos in ((1, 1), (2, 0)):
        t = Traffic()
        cpu0, rss_before = (cpu_seconds(pid), rss_kib(pid)) if pid else (0.0, 0)
        others0 = {name: cpu_seconds(p) for name, p in others.items()}
        sub.samples.clear()
        start = time.monotonic()
        start_ns = time.monotonic_ns()
        stop = start + args.seconds
        log(f"QoS {qos}: {args.seconds:g} s, one message per device every {args.interval:g} s...")
        await asyncio.gather(
            *(
                device_traffic(c, i, f"load/{devices[i].thing}", phase, qos, stop, args, t)
                for i, c in conns.items()
            )
        )
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
        others_cpu = {name: cpu_seconds(p) - others0[name] for name, p in others.items()}
        await sub.settle()
        got = {k for k in sub.seen if k[0] == phase}
        latencies = [lat for _, lat in sub.samples]
        warm = start_ns + int(2 * args.interval * 1e9)
        steady = [lat for sent, lat in sub.samples if sent >= warm]
        report[f"QoS {qos} p99 ms per second"] = per_second_p99(sub.samples, start_ns)
        row: dict[str, Any] = {
            "sent": len(t.sent),
            "acknowledged": t.acked if qos else "-",
            "received (unique)": len(got),
            "lost": len(t.sent - got),
            "unexpected": len(got - t.sent),
            "duplicates": sub.duplicates,
            "ack timeouts": t.ack_timeouts if qos else "-",
            "send errors": t.send_errors,
            "msgs/s": round(len(got) / elapsed),
            "latency p50 ms": round(pct(latencies, 0.50), 2),
            "latency p99 ms": round(pct(latencies, 0.99), 2),
            "latency p99.9 ms": round(pct(latencies, 0.999), 2),
            "latency max ms": round(max(latencies, default=0) / 1e6, 2),
            # Without the phase's first two intervals: is a tail a start-up burst or steady?
            "p99 after 2 intervals ms": round(pct(steady, 0.99), 2),
        }
        if pid:
            row["proxy CPU s"] = round(cpu, 2)
            row["proxy CPU % of a core"] = round(100 * cpu / elapsed, 1)
            row["proxy CPU µs per message"] = round(cpu * 1e6 / max(1, len(got)), 1)
            row["proxy RSS MiB (end)"] = round(rss_kib(pid) / 1024, 1)
            row["proxy RSS growth KiB"] = rss_kib(pid) - rss_before
        for name, used in others_cpu.items():
            row[f"{name} CPU % of a core"] = round(100 * used / elapsed, 1)
        sub.duplicates = 0
        report[f"QoS {qos}"] = row
        for c in conns.values():  # acks that arrived after a timeout must not satisfy the next phase
            while not c.acks.empty():
                c.acks.get_nowait()

    report["dropped by the end"] = sum(1 for c in conns.values() if c.task is not None and c.task.done())
    for name, p in others.items():
        report[f"{name} CPU s total"] = round(cpu_seconds(p) - others_start[name], 2)
    if not pid or target.http_port is None:
        await asyncio.gather(*(c.close() for c in conns.values()))
        return
    report["proxy CPU s total"] = round(cpu_seconds(pid) - cpu_start, 2)
    report["proxy CPU % total"] = round(
        100 * (cpu_seconds(pid) - cpu_start) / (time.monotonic() - run_start), 1
    )
    report["proxy peak RSS MiB"] = round(peak_rss_kib(pid) / 1024, 1)
    report["proxy peak RSS KiB per connection"] = round(
        (peak_rss_kib(pid) - base_rss) / max(1, len(conns)), 1
    )
    # Read while the devices are still connected: the gauges then show the live sessions.
    report["proxy metrics"] = {
        k: v
        for k, v in (await asyncio.to_thread(proxy_metrics, target.http_port)).items()
        if k.startswith("cloudconnector_proxy_") and not k.endswith(("_bucket", "_created"))
    }
    await asyncio.gather(*(c.close() for c in conns.values()))


def per_second_p99(samples: list[tuple[int, int]], start_ns: int) -> list[float]:
    """The p99 latency of the messages sent in each second of a phase (where the tail comes from)."""
    buckets: dict[int, list[int]] = {}
    for sent, lat in samples:
        buckets.setdefault(int((sent - start_ns) // 1_000_000_000), []).append(lat)
    return [round(pct(buckets[s], 0.99), 1) for s in sorted(buckets)]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    print(
        f"\n{args.devices} devices ({args.path}), {args.seconds:g} s per QoS phase, "
        f"one {PAYLOAD}-byte message per device every {args.interval:g} s"
    )
    for key, value in report.items():
        if key.startswith("QoS"):
            continue  # the phases' table below; the per-second series only in --json
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<56} {v:g}" if isinstance(v, float | int) else f"  {k:<56} {v}")
        else:
            print(f"{key:<40}{value}")
    phases = [k for k in report if k.startswith("QoS") and isinstance(report[k], dict)]
    print("".ljust(28) + "".join(p.rjust(12) for p in phases))
    for k in report[phases[0]]:
        print(k.ljust(28) + "".join(str(report[p][k]).rjust(12) for p in phases))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each QoS phase")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between a device's messages")
    p.add_argument("--parallel", type=int, default=50, help="connections being set up at once")
    p.add_argument("--ack-timeout", type=float, default=30.0, help="limit on a CONNACK or PUBACK wait")
    p.add_argument("--path", choices=("proxy", "direct"), default="proxy", help="direct: the baseline")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() in the proxy after set-up")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--serve-proxy", type=Path, help=argparse.SUPPRESS)  # the launcher role
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--http-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_proxy:
        serve_proxy(args.serve_proxy, args.port, args.http_port)
        return
    # This process holds N device sockets, the proxy 2N, mosquitto N: each has its own limit.
    hard = raise_nofile(2 * args.devices + 200)
    import uvloop

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "open-files limit": hard,
    }
    uvloop.run(run(args, report))
    print_report(args, report)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **report}, indent=2)
        )


if __name__ == "__main__":
    main()
