"""Proxy benchmark: N devices through the proxy vs direct mutual TLS vs nginx's stream module.

One command, prints a table (not a test):

    python bench/proxy_bench.py --devices 1000 --seconds 5

All three paths end at the same local mosquitto (mutual TLS, identity from the certificate).
Each device has its own key, certificate and 127.x source address. For every path it measures:
connection setup rate, memory per idle connection and CPU per connection of the middle process,
then at QoS 0 and 1, paced (each device one message per --interval seconds) and at the maximum
rate: messages/s delivered to a subscriber, end-to-end latency p50/p99 and CPU per message of the
middle process. The load generator is one asyncio process (uvloop); at high rates it is often the
bottleneck itself, which the "direct" column shows.

nginx needs its stream module (Debian: ``apt-get install libnginx-mod-stream``); without it that
column is skipped. The broker runs with Nagle off (``set_tcp_nodelay``), like nginx and the
proxy; each connection's first message is reported on its own row, before the paced phases; the
paced phases start on a quiet system (broker and middle process idle) and each device sends on a
fixed grid. Figures, several runs and the targets are in docs/benchmarks.md, section 6. Diagnosis
hooks: ``CC_BENCH_GCLOG=1`` (the proxy's garbage collections over 0.5 ms, with phase marks) and
``CC_BENCH_CPROFILE=FILE`` (a profile of the proxy process, written when its path ends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import pwd
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.model import EndpointType, ObjectRef  # noqa: E402
from cloudconnector.mqtt import codec  # noqa: E402
from cloudconnector.mqtt.packets import Connack, Connect, Puback, Publish, Subscribe, Subscription  # noqa: E402
from cloudconnector.routes import Route  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, port_open, run_mosquitto, wait_for  # noqa: E402

PAYLOAD = 64
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # Debian: libnginx-mod-stream


@dataclass
class Device:
    ip: str
    thing: str
    cert: Path
    key: Path
    cert_pem: str = field(repr=False)
    key_pem: bytes = field(repr=False)


def device_ip(i: int) -> str:
    return f"127.{10 + i // 60000}.{(i // 250) % 240 + 1}.{i % 250 + 2}"


def make_devices(ca: CA, n: int, d: Path) -> list[Device]:
    out = []
    for i in range(n):
        thing = f"bench_dev{i}"
        issued = ca.issue(thing, client=True)
        cert, key = issued.write(d, thing)
        out.append(Device(device_ip(i), thing, cert, key, issued.cert_pem, issued.key_pem))
    return out


# ---------------------------------------------------------------- processes under test


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class MemoryKeys:
    def __init__(self, items: dict[ObjectRef, KeyMaterial]) -> None:
        self.items = items

    async def get(self, device: ObjectRef) -> KeyMaterial:
        return self.items[device]


def _proxy_child(devices: list[Device], broker_port: int, ca_pem: str, port: int, ready: Any) -> None:
    import logging

    import uvloop

    from cloudconnector.proxy.config import ProxyConfig
    from cloudconnector.proxy.directory import StaticDirectory
    from cloudconnector.proxy.server import Proxy

    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("CC_BENCH_GCLOG"):  # diagnosis: the proxy's collections over 0.5 ms, timed
        began = [0.0]

        def gc_log(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            elif (ms := (time.perf_counter() - began[0]) * 1000) > 0.5:
                gen = info["generation"]
                print(f"{time.time():.2f} proxy gc gen{gen} {ms:.1f} ms", file=sys.stderr, flush=True)

        gc.callbacks.append(gc_log)
    routes, keys = [], {}
    for i, dev in enumerate(devices):
        ref = ObjectRef("bench", f"dev{i}")
        routes.append(
            Route(
                ref,
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
        )
        keys[ref] = KeyMaterial(dev.cert_pem, dev.key_pem)
    cfg = ProxyConfig(
        bind="127.0.0.1", mqtt_port=port, tls_port=None, http_port=None, max_connections=100_000
    )

    async def main() -> None:
        proxy = Proxy(cfg, StaticDirectory(routes), MemoryKeys(keys))
        await proxy.start()
        stopped = asyncio.Event()
        profile_out = os.environ.get("CC_BENCH_CPROFILE")  # diagnosis: where the proxy's CPU goes
        if profile_out:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        ready.send(True)
        await stopped.wait()
        if profile_out:
            profiler.disable()
            profiler.dump_stats(profile_out)

    uvloop.run(main())


@contextlib.contextmanager
def run_proxy(devices: list[Device], broker_port: int, ca_pem: str, start: str = "fork") -> Any:
    # "fork" inherits the generator's heap, whose free chunks the new sessions then fill without
    # growing RSS; "spawn" starts a fresh interpreter, like the proxy in production.
    port = free_port()
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context(start).Process(
        target=_proxy_child, args=(devices, broker_port, ca_pem, port, child), daemon=True
    )
    proc.start()
    parent.recv()
    try:
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.join(10)


@contextlib.contextmanager
def run_nginx(devices: list[Device], broker_port: int, ca_file: Path, d: Path) -> Any:
    port = free_port()
    certs = "\n".join(f"    {dev.ip} {dev.cert};" for dev in devices)
    keys = "\n".join(f"    {dev.ip} {dev.key};" for dev in devices)
    conf = d / "nginx.conf"
    conf.write_text(f"""
load_module {NGINX_STREAM};
user {pwd.getpwuid(os.getuid()).pw_name};
worker_processes 1;
worker_rlimit_nofile 200000;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 100000; }}
stream {{
  map_hash_bucket_size 128;
  map $remote_addr $device_cert {{
{certs}
    default "";
  }}
  map $remote_addr $device_key {{
{keys}
    default "";
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_pass localhost:{broker_port};
    proxy_ssl on;
    proxy_ssl_certificate $device_cert;
    proxy_ssl_certificate_key $device_key;
    proxy_ssl_session_reuse off;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {ca_file};
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
  }}
}}
""")
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(d)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="nginx")
        worker = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
        yield worker, port
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- load generator


class Conn:
    """A minimal MQTT 3.1.1 client on asyncio streams, built on the project's codec."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.acks: asyncio.Queue[int] = asyncio.Queue()
        self.on_publish: Any = None
        self.task: asyncio.Task[None] | None = None
        self.next_id = 0

    async def open(self, port: int, client_id: str, *, bind: str | None, tls: ssl.SSLContext | None) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "localhost" if tls else "127.0.0.1",
            port,
            ssl=tls,
            local_addr=(bind, 0) if bind else None,
            server_hostname="localhost" if tls else None,
        )
        self.writer.write(codec.encode(Connect(client_id, keep_alive=600)))
        header, body = await codec.read_packet(self.reader)
        connack = codec.decode(header, body)
        if not isinstance(connack, Connack) or connack.reason_code:
            raise RuntimeError(f"{client_id}: refused {connack}")
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header, body = await codec.read_packet(self.reader, 1 << 20)
                packet = codec.decode(header, body)
                if isinstance(packet, Puback):
                    self.acks.put_nowait(packet.packet_id)
                elif isinstance(packet, Publish):
                    if self.on_publish:
                        self.on_publish(packet)
                    if packet.qos == 1 and packet.packet_id:
                        self.writer.write(codec.encode(Puback(packet.packet_id)))

    def pid(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def stamp() -> bytes:
    return struct.pack("!q", time.monotonic_ns()).ljust(PAYLOAD, b".")


class Sink:
    """The subscriber: counts messages and their one-way latency (same host, same clock)."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.count = 0
        self.last = 0.0

    def __call__(self, p: Publish) -> None:
        now = time.monotonic_ns()
        self.count += 1
        self.last = time.monotonic()
        self.latencies.append(now - struct.unpack("!q", p.payload[:8])[0])

    def reset(self) -> None:
        self.latencies.clear()
        self.count = 0

    async def settle(self, quiet: float = 0.5, limit: float = 30) -> None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            before = self.count
            await asyncio.sleep(quiet)
            if self.count == before:
                return


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e6


async def quiesce(pids: list[int], idle: float = 0.05, limit: float = 20.0) -> float:
    """Wait until ``pids`` together use under ``idle`` of a core for half a second; returns the wait."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = sum(cpu_seconds(p) for p in pids)
        await asyncio.sleep(0.5)
        if sum(cpu_seconds(p) for p in pids) - before < idle * 0.5:
            break
    return time.monotonic() - start


async def paced(
    c: Conn, topic: str, qos: int, stop: float, interval: float, first: float, sent: list[int]
) -> None:
    # Each device sends on its own fixed grid (first + k * interval), not "interval after the last
    # ack": otherwise devices whose acks came back together stay in step and send in bursts.
    slot = first
    while slot < stop:
        await asyncio.sleep(max(0.0, slot - time.monotonic()))
        c.writer.write(codec.encode(Publish(topic, stamp(), qos, packet_id=c.pid() if qos else None)))
        sent[0] += 1
        if qos:
            await c.acks.get()
        slot += interval


async def flood(c: Conn, topic: str, qos: int, stop: float, sent: list[int]) -> None:
    window = 0
    while time.monotonic() < stop:
        c.writer.write(codec.encode(Publish(topic, stamp(), qos, packet_id=c.pid() if qos else None)))
        sent[0] += 1
        if qos:
            window += 1
            if window >= 8:
                await c.acks.get()
                window -= 1
        await c.writer.drain()
        if not qos:
            await asyncio.sleep(0)


@dataclass
class Result:
    path: str
    rows: dict[str, str] = field(default_factory=dict)


async def bench_path(
    name: str,
    devices: list[Device],
    port: int,
    middle_pid: int | None,
    tls_for: Any,
    sink_conn: Conn,
    sink: Sink,
    args: argparse.Namespace,
) -> Result:
    res = Result(name)
    conns: list[Conn] = []
    sem = asyncio.Semaphore(args.parallel)
    base_rss = rss_kib(middle_pid) if middle_pid else 0
    cpu0 = cpu_seconds(middle_pid) if middle_pid else 0.0

    async def connect(dev: Device) -> None:
        async with sem:
            c = Conn()
            await c.open(
                port, dev.thing, bind=dev.ip if not tls_for else None, tls=tls_for(dev) if tls_for else None
            )
            conns.append(c)

    # Two halves: the memory figure is the slope between them, so the heap's one-time growth
    # (transient handshake buffers of many concurrent set-ups) is not counted per connection.
    half = len(devices) // 2
    t0 = time.perf_counter()
    await asyncio.gather(*(connect(d) for d in devices[:half]))
    took = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    mid_rss = rss_kib(middle_pid) if middle_pid else 0
    t0 = time.perf_counter()
    await asyncio.gather(*(connect(d) for d in devices[half:]))
    took += time.perf_counter() - t0
    res.rows["connections/s"] = f"{len(devices) / took:.0f}"
    if middle_pid:
        cpu_total = cpu_seconds(middle_pid) - cpu0
        await asyncio.sleep(1.0)  # let allocations settle
        res.rows["CPU ms/connection"] = f"{cpu_total * 1000 / len(devices):.2f}"
        end_rss = rss_kib(middle_pid)
        res.rows["KiB/idle conn (avg)"] = f"{(end_rss - base_rss) / len(devices):.1f}"
        res.rows["KiB/idle conn (slope)"] = f"{(end_rss - mid_rss) / (len(devices) - half):.1f}"
    things = [d.thing for d in devices]
    # The generator's own full collections (it holds every device's keys and connections) would
    # pause its loop and send the paced messages in bursts: a measuring artefact, kept out.
    gc.collect()
    gc.freeze()

    # Each connection's first message, on its own row: it is where per-connection first-use costs
    # would show (with the broker's Nagle on it had a ≈ 35 ms p99, docs/benchmarks.md section 6).
    await quiesce([p for p in (args.broker_pid, middle_pid) if p])
    sink.reset()
    begin = time.monotonic() + 0.25
    await asyncio.gather(
        *(
            paced(
                c,
                f"{things[i]}/m",
                0,
                begin + args.interval,
                args.interval,
                begin + args.interval * i / len(conns),
                [0],
            )
            for i, c in enumerate(conns)
        )
    )
    await sink.settle()
    res.rows["first message p50 / p99 ms"] = (
        f"{pct(sink.latencies, 0.5):.2f} / {pct(sink.latencies, 0.99):.2f}"
    )

    for qos in (0, 1):
        # Paced latency is measured on a quiet system: the broker may still be working off the
        # previous phase (or path) well after its subscriber went quiet.
        waited = await quiesce([p for p in (args.broker_pid, middle_pid) if p])
        if os.environ.get("CC_BENCH_GCLOG"):
            print(f"{time.time():.2f} quiet after {waited:.1f} s", file=sys.stderr, flush=True)
        # Paced: every device one message per interval, spread evenly.
        if os.environ.get("CC_BENCH_GCLOG"):
            print(f"{time.time():.2f} paced q{qos} starts", file=sys.stderr, flush=True)
        sink.reset()
        sent = [0]
        # The first slot lies after the start-up of all the senders: creating a thousand tasks
        # takes the generator's loop tens of ms, which would otherwise show as latency.
        begin = time.monotonic() + 0.25
        stop = begin + args.seconds
        await asyncio.gather(
            *(
                paced(
                    c,
                    f"{things[i]}/m",
                    qos,
                    stop,
                    args.interval,
                    begin + args.interval * i / len(conns),
                    sent,
                )
                for i, c in enumerate(conns)
            )
        )
        await sink.settle()
        res.rows[f"paced q{qos} delivered"] = f"{sink.count}/{sent[0]}"
        res.rows[f"paced q{qos} p50 ms"] = f"{pct(sink.latencies, 0.5):.2f}"
        res.rows[f"paced q{qos} p99 ms"] = f"{pct(sink.latencies, 0.99):.2f}"

        # Maximum rate: every device publishes back to back (QoS 1 with a window of 8).
        if os.environ.get("CC_BENCH_GCLOG"):
            print(f"{time.time():.2f} max q{qos} starts", file=sys.stderr, flush=True)
        sink.reset()
        cpu0 = cpu_seconds(middle_pid) if middle_pid else 0.0
        start = time.monotonic()
        stop = start + args.seconds
        await asyncio.gather(*(flood(c, f"{things[i]}/m", qos, stop, sent) for i, c in enumerate(conns)))
        await sink.settle()
        elapsed = max(sink.last - start, 1e-9)
        res.rows[f"max q{qos} msgs/s"] = f"{sink.count / elapsed:.0f}"
        res.rows[f"max q{qos} p99 ms"] = f"{pct(sink.latencies, 0.99):.1f}"
        if middle_pid and sink.count:
            res.rows[f"max q{qos} CPU µs/msg"] = f"{(cpu_seconds(middle_pid) - cpu0) * 1e6 / sink.count:.1f}"
        for c in conns:  # drop acks left over from the window
            while not c.acks.empty():
                c.acks.get_nowait()

    await asyncio.gather(*(c.close() for c in conns))
    return res


def broker_conf(port: int, d: Path) -> str:
    """mosquitto with mutual TLS only, the client certificate's CN as user name.

    Expects ``ca.crt``, ``broker.crt`` and ``broker.key`` in ``d``."""
    return "\n".join(
        [
            "per_listener_settings false",
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous false",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            # Nagle off, as in the proxy and nginx: with it, QoS 0 messages to the subscriber (which
            # sends nothing back to carry an ACK) waited for delayed ACKs, ≈ 30-40 ms at p99.
            "set_tcp_nodelay true",
            f"listener {port} 127.0.0.1",
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'broker.crt'}",
            f"keyfile {d / 'broker.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            "",
        ]
    )


def tls_client(ca_file: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def run_all(args: argparse.Namespace) -> list[Result]:
    d = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    try:
        ca = CA()
        ca_file = d / "ca.crt"
        ca_file.write_text(ca.cert_pem)
        ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
        admin = ca.issue("admin", client=True)
        admin.write(d, "admin")
        print(f"making {args.devices} device certificates...", file=sys.stderr)
        devices = make_devices(ca, args.devices, d)
        bport = free_port()
        results = []
        with run_mosquitto(broker_conf(bport, d), bport, d) as broker:
            args.broker_pid = broker.proc.pid

            def client_tls(cert: Path, key: Path) -> ssl.SSLContext:
                return tls_client(ca_file, cert, key)

            sink = Sink()
            sink_conn = Conn()
            await sink_conn.open(
                bport, "bench-sink", bind=None, tls=client_tls(d / "admin.crt", d / "admin.key")
            )
            sink_conn.on_publish = sink
            sink_conn.writer.write(codec.encode(Subscribe(1, (Subscription("#", 1),))))
            await asyncio.sleep(0.2)
            paths = args.paths.split(",")
            if "direct" in paths:
                print("direct...", file=sys.stderr)
                results.append(
                    await bench_path(
                        "direct mTLS",
                        devices,
                        bport,
                        None,
                        lambda dev: client_tls(dev.cert, dev.key),
                        sink_conn,
                        sink,
                        args,
                    )
                )
            if "proxy" in paths:
                print("proxy...", file=sys.stderr)
                with run_proxy(devices, bport, ca.cert_pem, args.proxy_start) as (pid, port):
                    results.append(await bench_path("proxy", devices, port, pid, None, sink_conn, sink, args))
            if "nginx" in paths:
                print("nginx...", file=sys.stderr)
                with run_nginx(devices, bport, ca_file, d) as (pid, port):
                    results.append(
                        await bench_path("nginx stream", devices, port, pid, None, sink_conn, sink, args)
                    )
            await sink_conn.close()
        return results
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each traffic phase")
    p.add_argument("--interval", type=float, default=1.0, help="paced: seconds between a device's messages")
    p.add_argument("--parallel", type=int, default=50, help="connections being set up at once")
    p.add_argument("--paths", default="direct,proxy,nginx")
    p.add_argument(
        "--proxy-start",
        choices=("fork", "spawn"),
        default="fork",
        help="spawn: the proxy in a fresh interpreter (its memory figure then excludes inherited free heap)",
    )
    args = p.parse_args()
    if not NGINX_STREAM.exists():
        print("nginx stream module missing (apt-get install libnginx-mod-stream): skipped", file=sys.stderr)
        args.paths = ",".join(x for x in args.paths.split(",") if x != "nginx")
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    results = uvloop.run(run_all(args))
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.rows if k not in keys]
    width = max(len(k) for k in keys) + 2
    print(f"\n{args.devices} devices, {args.seconds:g} s per phase, paced interval {args.interval:g} s")
    print("".ljust(width) + "".join(r.path.rjust(16) for r in results))
    for k in keys:
        print(k.ljust(width) + "".join(r.rows.get(k, "-").rjust(16) for r in results))


if __name__ == "__main__":
    main()
