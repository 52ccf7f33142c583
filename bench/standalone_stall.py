"""Stall probe for ``cloud-connector run``: does reconciling ever hold up the relay?

One command, prints a table (not a test)::

    python bench/standalone_stall.py --devices 5000 --idle 130        # the issue's size
    python bench/standalone_stall.py --devices 300 --idle 15 --after 5   # a smoke run

It runs the product the way a user does: ``cloud-connector run -f DIR`` as its own process, with the
embedded key store, its plain MQTT listener and uvloop when installed. DIR holds an ``MqttBroker``
Endpoint pointing at a local mosquitto (TLS, client certificate required), a Group, one Secret with
a client certificate the Devices adopt, and ``--devices`` Devices in ``devices.yaml`` (all in one
file: an edit then means re-reading every Device, the worst case). Once every Device is Ready, one
probe Device (source address 127.0.0.2) connects through the proxy and publishes at QoS 1 every
``--every`` seconds, waiting for each PUBACK; the round trip is device → proxy → broker → proxy →
device. Phases: ``idle`` (nothing changes for ``--idle`` seconds: a timer-driven re-read would show
here), then ``edit`` (one Device added to ``devices.yaml``, probing for ``--after`` seconds) and
``remove`` (that Device removed again). For each phase it prints the samples, p50, p99 and max
round trip, and for the edits how long until the change was applied (the new Device Ready, then
gone), read from the state database the way ``cloud-connector status`` reads it. It also prints the
run process's CPU share while idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloudconnector.mqtt import codec  # noqa: E402
from cloudconnector.mqtt.packets import Connack, Connect, Puback, Publish  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import free_port, port_open, run_mosquitto, wait_for  # noqa: E402

API = "cloudconnector.io/v1alpha1"
NS = "stall"
PROBE_IP = "127.0.0.2"


def broker_conf(port: int, d: Path) -> str:
    return "\n".join(
        [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            f"listener {port} 127.0.0.1",
            f"cafile {d / 'ca.crt'}",
            f"certfile {d / 'broker.crt'}",
            f"keyfile {d / 'broker.key'}",
            "require_certificate true",
            "",
        ]
    )


def device(i: int) -> dict[str, object]:
    ip = PROBE_IP if i == 0 else f"10.{64 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"
    return {
        "apiVersion": API,
        "kind": "Device",
        "metadata": {"name": f"dev-{i:06d}", "namespace": NS},
        "spec": {
            "group": "probe",
            "sim": {"iccid": f"89353{i:014d}"},
            "ip": ip,
            "credentialsSecretRef": {"name": "broker-cert"},
        },
    }


def write_manifests(d: Path, ca: CA, broker_port: int, devices: int) -> None:
    client = ca.issue("stall-device", client=True)
    head = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "broker-cert", "namespace": NS},
            "stringData": {"tls.crt": client.cert_pem, "tls.key": client.key_pem.decode()},
        },
        {
            "apiVersion": API,
            "kind": "Endpoint",
            "metadata": {"name": "broker", "namespace": NS},
            "spec": {
                "type": "MqttBroker",
                "port": broker_port,
                "caCertificate": ca.cert_pem,
                "rateLimit": {"devicesPerSecond": 1000},
                "mqtt": {"host": "127.0.0.1"},
            },
        },
        {
            "apiVersion": API,
            "kind": "Group",
            "metadata": {"name": "probe", "namespace": NS},
            "spec": {"endpointRef": {"name": "broker"}},
        },
    ]
    (d / "endpoint.yaml").write_text(yaml.safe_dump_all(head, sort_keys=False))
    write_devices(d, devices)


def write_devices(d: Path, count: int) -> None:
    # Written aside and renamed, as editors and config tools do: the reader never sees half a file.
    tmp = d / ".devices.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all([device(i) for i in range(count)], sort_keys=False))
    tmp.rename(d / "devices.yaml")


def phases(state: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT name, status FROM objects WHERE kind = 'Device'").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()
    return {name: json.loads(status).get("phase", "") for name, status in rows}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Probe:
    """One device: QoS 1 publishes on a fixed period, each round trip to its PUBACK recorded."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.acks: asyncio.Queue[int] = asyncio.Queue()

    async def open(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(PROBE_IP, 0))
        self.writer.write(codec.encode(Connect("probe", keep_alive=600)))
        header, body = await asyncio.wait_for(codec.read_packet(self.reader), 30)
        connack = codec.decode(header, body)
        if not isinstance(connack, Connack) or connack.reason_code:
            raise RuntimeError(f"probe refused: {connack}")
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header, body = await codec.read_packet(self.reader, 1 << 16)
                packet = codec.decode(header, body)
                if isinstance(packet, Puback):
                    self.acks.put_nowait(packet.packet_id)

    async def run(self, seconds: float, every: float) -> list[float]:
        out: list[float] = []
        end = time.monotonic() + seconds
        pid = 0
        tick = time.monotonic()
        while time.monotonic() < end:
            pid = pid % 65535 + 1
            sent = time.perf_counter()
            self.writer.write(codec.encode(Publish("probe/rtt", b"x" * 64, qos=1, packet_id=pid)))
            got = await asyncio.wait_for(self.acks.get(), 30)
            out.append((time.perf_counter() - sent) * 1000)
            if got != pid:
                raise RuntimeError(f"PUBACK {got} for {pid}")
            tick += every
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
        return out

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def until(check: object, limit: float) -> float:
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > limit:
            raise TimeoutError(f"not applied within {limit:.0f} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def measure(args: argparse.Namespace, d: Path, run: subprocess.Popen[bytes], port: int) -> None:
    manifests, state = d / "manifests", d / "state"
    probe = Probe()
    for _ in range(600):  # Ready in the store comes a moment before the route reaches the proxy
        try:
            await probe.open(port)
            break
        except (RuntimeError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the probe device was never routed")
    rows: list[tuple[str, list[float], str]] = []
    try:
        await probe.run(2.0, args.every)  # warm-up: first session set-up, caches
        cpu0, t0 = cpu_seconds(run.pid), time.monotonic()
        idle = await probe.run(args.idle, args.every)
        idle_cpu = (cpu_seconds(run.pid) - cpu0) / (time.monotonic() - t0)
        rows.append(("idle", idle, f"run process CPU {idle_cpu * 100:.1f} % of a core"))

        new = f"dev-{args.devices:06d}"
        for name, count, applied in (
            ("edit", args.devices + 1, lambda: phases(state).get(new) == "Ready"),
            ("remove", args.devices, lambda: new not in phases(state)),
        ):
            write_devices(manifests, count)
            probing = asyncio.create_task(probe.run(args.after, args.every))
            took = await until(applied, args.after + 60)
            rows.append((name, await probing, f"applied after {took:.2f} s"))
    finally:
        await probe.close()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\ncloud-connector run, {args.devices} Devices, QoS 1 every {args.every * 1000:.0f} ms")
    print(f"load average at the end (1 / 5 / 15 min): {load} on {os.cpu_count()} CPUs")
    print(f"{'phase':8} {'samples':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  note")
    for name, samples, note in rows:
        print(
            f"{name:8} {len(samples):8d} {pct(samples, 0.5):8.2f} {pct(samples, 0.99):8.2f}"
            f" {max(samples):8.2f}  {note}"
        )


async def settle(state: Path, devices: int, limit: float) -> None:
    start = time.monotonic()
    print(f"provisioning {devices} Devices...", file=sys.stderr)
    await until(lambda: sum(p == "Ready" for p in phases(state).values()) >= devices, limit)
    print(f"all Ready after {time.monotonic() - start:.1f} s", file=sys.stderr)


def run_bench(args: argparse.Namespace, loop_run: Any) -> None:
    d = Path(tempfile.mkdtemp(prefix="stall-bench-"))
    manifests = d / "manifests"
    manifests.mkdir()
    ca = CA()
    (d / "ca.crt").write_text(ca.cert_pem)
    ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
    bport, port = free_port(), free_port()
    write_manifests(manifests, ca, bport, args.devices)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "CLOUDCONNECTOR_"))}
    with run_mosquitto(broker_conf(bport, d), bport, d), (d / "run.log").open("wb") as log:
        cmd = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(manifests)]
        cmd += ["--state", str(d / "state"), "--bind", "127.0.0.1", "--mqtt-port", str(port)]
        run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: port_open("127.0.0.1", port), 60, "cloud-connector run")
            loop_run(settle(d / "state", args.devices, args.settle))
            loop_run(measure(args, d, run, port))
        finally:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(20)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
    if args.keep:
        print(f"kept {d}", file=sys.stderr)
    else:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=5000, help="Devices in the manifest directory")
    p.add_argument("--every", type=float, default=0.01, help="seconds between the probe's messages")
    p.add_argument("--idle", type=float, default=130.0, help="seconds of probing with nothing changed")
    p.add_argument("--after", type=float, default=20.0, help="seconds of probing after each edit")
    p.add_argument("--settle", type=float, default=900.0, help="limit for provisioning every Device")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, state)")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        run_bench(args, asyncio.run)
    else:
        run_bench(args, uvloop.run)


if __name__ == "__main__":
    main()
