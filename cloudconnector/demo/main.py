"""``cloud-connector demo``: the whole product on one machine, checked end to end.

moto plays the AWS IoT control plane, mosquitto with mutual TLS the data plane; the standalone core
provisions N devices (the same code the operator runs), the in-process proxy relays their plain
MQTT, and an observer at the broker confirms that every message arrived under its own device's
certificate. The exit status is 0 only if every device was provisioned, every message was
delivered under the right identity, foreign certificates were refused and the clean-up left
nothing in the cloud.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3

from cloudconnector.demo.devices import DeviceRun, run_device
from cloudconnector.demo.identity import cross_check
from cloudconnector.demo.manifests import write_manifests
from cloudconnector.demo.observer import Observer
from cloudconnector.demo.pki import DemoCA, trust_anchor
from cloudconnector.demo.progress import ProgressBar
from cloudconnector.demo.standins import run_broker, run_moto
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.routes import Route
from cloudconnector.standalone.app import Standalone, standalone
from cloudconnector.standalone.keys import open_key_stores
from cloudconnector.standalone.serve import plain_proxy, proxy_server
from cloudconnector.standalone.store import StoredObject


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        for part in ("manifests", "state", "broker"):  # a previous run's moto is gone with its state
            shutil.rmtree(path / part, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="cc-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _cloud_inventory(moto_url: str) -> tuple[int, int]:
    iot = boto3.client(
        "iot",
        endpoint_url=moto_url,
        region_name="eu-west-1",
        aws_access_key_id="demo",
        aws_secret_access_key="demo",  # noqa: S106 - moto accepts any key
    )
    things = sum(len(page.get("things", [])) for page in iot.get_paginator("list_things").paginate())
    certificates = sum(
        len(page.get("certificates", [])) for page in iot.get_paginator("list_certificates").paginate()
    )
    return things, certificates


Check = tuple[str, bool, str]


@dataclasses.dataclass
class Demo:
    """One demo run's shared facts, so each step is a small function."""

    size: int
    messages: int
    workdir: Path
    moto_url: str
    ca: DemoCA
    ports: dict[str, int] = dataclasses.field(default_factory=dict)  # thing -> broker listener
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def manifests(self) -> Path:
        return self.workdir / "manifests"

    def to_listener(self, route: Route) -> Route:
        # moto's certificates all share one subject, so the demo broker gives each device its own
        # listener (see demo/pki.py); AWS itself has one data endpoint for all devices.
        return dataclasses.replace(route, port=self.ports.get(route.client_id, route.port))


async def run_demo(devices: int = 50, messages: int = 5, keep: str | None = None) -> int:
    if not 1 <= devices <= 60000:
        print("--devices must be between 1 and 60000", file=sys.stderr)
        return 2
    with _workdir(keep) as workdir, run_moto() as moto_url:
        _say(f"moto (AWS IoT control plane) at {moto_url}; working in {workdir}")
        demo = Demo(devices, messages, workdir, moto_url, DemoCA())
        write_manifests(demo.manifests, moto_url, demo.ca.cert_pem, devices)
        bar = ProgressBar(devices)
        # Always the embedded key store, whatever VAULT_ADDR the user's shell has.
        keys = open_key_stores(workdir / "state", env={})
        async with standalone(
            demo.manifests,
            workdir / "state",
            on_device=bar.update,
            route_transform=demo.to_listener,
            keys=keys,
        ) as sa:
            ready = await _provision(demo, sa, bar)
            if ready:
                await _traffic(demo, sa, ready)
            await _clean_up(demo, sa)
    return _summary(demo.checks)


def _limit(demo: Demo) -> float:
    return max(120.0, demo.size / 5)


async def _provision(demo: Demo, sa: Standalone, bar: ProgressBar) -> list[StoredObject]:
    started = time.monotonic()
    result = await sa.runner.run_until_settled(limit=_limit(demo))
    bar.finish()
    elapsed = time.monotonic() - started
    ready = [o for o in sa.store.list("Device") if o.status.get("phase") == "Ready"]
    things, certs = _cloud_inventory(demo.moto_url)
    rate = len(ready) / max(elapsed, 1e-3)
    detail = f"{len(ready)}/{demo.size} Ready in {elapsed:.1f}s ({rate:.1f}/s); moto: {things} things"
    demo.checks.append(("devices provisioned", len(ready) == demo.size == things, f"{detail}, {certs} certs"))
    for error in result.errors:
        _say(f"  manifest error: {error}")
    for name, message in sorted(result.failed.items()):
        _say(f"  {name}: {message}")
    return ready


async def _traffic(demo: Demo, sa: Standalone, ready: list[StoredObject]) -> None:
    materials: dict[str, KeyMaterial] = {}
    anchors: dict[str, str] = {}
    for obj in ready:
        material = await sa.keys.reader.get(obj.ref)
        cloud_id = str(obj.status["cloudId"])
        materials[cloud_id] = material
        anchors[cloud_id] = trust_anchor(material.certificate_pem, material.private_key_pem)
    with run_broker(demo.workdir / "broker", anchors, demo.ca) as broker:
        demo.ports.update(broker.device_ports)
        sa.runner.publish_routes()
        _say(f"mosquitto (IoT Core data plane, mutual TLS): {len(anchors)} device listeners")
        routes = {r.client_id: r for r in sa.directory.routes()}
        refused, tried = await cross_check(routes, materials, broker.device_ports)
        materials.clear()
        detail = f"{refused}/{tried} sampled devices: own certificate accepted, another device's refused"
        demo.checks.append(("foreign certificates refused", tried > 0 and refused == tried, detail))
        observer = Observer(broker, demo.workdir)
        observer.start()
        try:
            async with proxy_server(sa.directory, sa.keys.reader, plain_proxy("127.0.0.1")) as proxy:
                port = proxy.ports["mqtt"]
                _say(
                    f"proxy on 127.0.0.1:{port}: {len(ready)} devices x {demo.messages} messages, plain MQTT"
                )
                runs = await asyncio.gather(
                    *(
                        run_device(
                            o.ref.name, str(o.status["cloudId"]), _ip(o), ("127.0.0.1", port), demo.messages
                        )
                        for o in ready
                    )
                )
                await asyncio.to_thread(observer.wait, len(ready) * demo.messages, 10.0)
        finally:
            observer.stop()
    demo.checks.extend(_delivery_checks(runs, observer, demo.size * demo.messages))


def _ip(obj: StoredObject) -> str:
    return str(obj.body["spec"]["ip"])


async def _clean_up(demo: Demo, sa: Standalone) -> None:
    """Remove the devices' manifest, as a user would, and let the core deprovision them."""
    (demo.manifests / "devices.yaml").unlink()
    await sa.runner.run_until_settled(limit=_limit(demo))
    things, certs = _cloud_inventory(demo.moto_url)
    left = len(sa.store.list("Device"))
    detail = f"manifests removed: {things} things, {certs} certificates, {left} devices left"
    demo.checks.append(("deprovisioned", things == certs == left == 0, detail))


def _delivery_checks(runs: list[DeviceRun], observer: Observer, wanted: int) -> list[Check]:
    acked = sum(r.acked for r in runs)
    failed = [r for r in runs if r.error]
    seen = list(observer.seen)
    unique = {(s.device, s.seq) for s in seen}
    own = [s for s in seen if s.identity == s.thing]
    latencies = [s.latency_ms for s in seen]
    detail = f"{len(unique)}/{wanted} at the broker, {acked} acknowledged to devices"
    if failed:
        detail += f"; {len(failed)} devices failed (first: {failed[0].name}: {failed[0].error})"
    return [
        ("messages delivered", len(unique) == wanted and not failed, detail),
        (
            "latency device->broker",
            bool(latencies),
            f"p50 {_percentile(latencies, 50):.2f} ms, p95 {_percentile(latencies, 95):.2f} ms,"
            f" p99 {_percentile(latencies, 99):.2f} ms",
        ),
        (
            "own certificate identity",
            bool(seen) and len(own) == len(seen) and observer.malformed == 0,
            f"{len(own)}/{len(seen)} messages entered the broker through their own device's certificate",
        ),
    ]


def _summary(checks: list[Check]) -> int:
    width = max(len(name) for name, _, _ in checks)
    _say("\nCloud Connector demo summary")
    for name, ok, detail in checks:
        _say(f"  {'ok  ' if ok else 'FAIL'} {name.ljust(width)}  {detail}")
    passed = all(ok for _, ok, _ in checks)
    _say("result: " + ("PASS" if passed else "FAIL"))
    return 0 if passed else 1
