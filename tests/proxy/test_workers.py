"""The proxy on N worker processes (proxy/workers.py), through `cloud-connector run --workers 2`:
devices with their own certificates at a mutual-TLS mosquitto, connecting from many loopback
addresses, land on both workers (the parent's /metrics counts each worker's connections and names
its pid); a killed worker is started again and its devices reconnect, shown disconnected in
between; a removed Device is refused by every worker; SIGTERM drains every worker. Live
connection status is written throughout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import kmock as kmocklib
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.kube.client import KubeClient
from cloudconnector.kube.config import KubeConfig
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.kube_directory import DEVICES, ENDPOINTS, GROUPS
from cloudconnector.proxy.workers import available_cores, worker_count
from tests.proxy.conftest import ACL, Client, Pki, broker_config
from tests.proxy.test_kube_directory import body, serve_crds
from tests.standalone.conftest import API, Site
from tests.standalone.test_cli_restart import phases
from tests.support.pki import CA
from tests.support.procs import Bao, Mosquitto, free_port, port_open, run_mosquitto, stop, wait_for

FLEET = 4


def _ip(i: int) -> str:
    return f"127.21.0.{10 + i}"


@pytest.fixture
def site_broker(tmp_path: Path) -> Iterator[tuple[CA, Mosquitto]]:
    ca = CA()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(tmp_path, "broker")
    (tmp_path / "acl").write_text(ACL)
    port = free_port()
    with run_mosquitto(broker_config(port, tmp_path), port) as b:
        yield ca, b


def _site(tmp_path: Path, ca: CA, mosquitto: Mosquitto, devices: range) -> Site:
    site = Site(tmp_path / "manifests", tmp_path / "state", "unused", "unused")
    site.manifests.mkdir(exist_ok=True)
    ns = site.namespace
    docs: list[dict] = [
        {
            "apiVersion": API,
            "kind": "Endpoint",
            "metadata": {"name": "broker", "namespace": ns},
            "spec": {
                "type": "MqttBroker",
                "port": mosquitto.port,
                "caCertificate": ca.cert_pem,
                "mqtt": {"host": "localhost"},
            },
        },
        site.group("meters", "broker"),
    ]
    for i in devices:
        issued = ca.issue(f"meter-{i}", client=True)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"meter-{i}-tls", "namespace": ns},
                "stringData": {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem.decode()},
            }
        )
    site.write("site.yaml", docs)
    site.write(
        "devices.yaml",
        [
            site.device(i, ip=_ip(i), cloudId=f"meter-{i}", credentialsSecretRef={"name": f"meter-{i}-tls"})
            for i in devices
        ],
    )
    return site


def _metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _per_worker(port: int, name: str) -> dict[str, float]:
    return {labels["worker"]: value for labels, value in _metrics(port).get(name, [])}


def _pids(port: int) -> dict[str, int]:
    return {
        labels["worker"]: int(labels["pid"])
        for labels, _ in _metrics(port).get("cloudconnector_proxy_worker_info", [])
    }


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _connections(site: Site) -> dict[str, dict]:
    db = sqlite3.connect(site.state / "state.db")
    try:
        rows = db.execute("SELECT name, connection FROM connections").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()
    return {name: json.loads(text) for name, text in rows}


def _connected(site: Site) -> set[str]:
    return {name for name, c in _connections(site).items() if c.get("connected")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_serve_one_port(tmp_path: Path, site_broker: tuple[CA, Mosquitto]) -> None:
    ca, mosquitto = site_broker
    site = _site(tmp_path, ca, mosquitto, range(FLEET))
    port, http = free_port(), free_port()
    env = {**os.environ, "CC_PROXY_STATUS_WRITES_PER_SECOND": "2"}
    cmd = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(site.manifests), "--workers", "2"]
    cmd += ["--bind", "127.0.0.1", "--mqtt-port", str(port), "--http-port", str(http)]
    cmd += ["--state", str(site.state)]
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    clients: dict[int, Client] = {}
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="the workers listening")
        wait_for(lambda: phases(site) == ["Ready"] * FLEET, timeout=60, what="the devices Ready")
        pids = _pids(http)
        assert sorted(pids) == ["0", "1"] and len(set(pids.values())) == 2
        assert all(_alive(pid) for pid in pids.values()) and _ready(http) == 200
        # A second proxy on the same port is refused in one line, not let into the workers' group.
        second = [*cmd[:-2], "--state", str(tmp_path / "second"), "--http-port", "0"]
        done = subprocess.run(second, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"run: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr

        # Many source addresses and ports: the kernel spreads them over both workers' sockets.
        for _ in range(3):
            for i in range(FLEET):
                c = Client(f"meter-{i}", bind=_ip(i))
                assert c.connect(port) == 0, i
                c.publish(f"meter-{i}/telemetry", b"1")
                c.close()
        taken = _per_worker(http, "cloudconnector_proxy_worker_connections_total")
        assert taken["0"] >= 1 and taken["1"] >= 1 and sum(taken.values()) >= 3 * FLEET, taken
        summed = dict(
            (tuple(sorted(lb.items())), v)
            for lb, v in _metrics(http)["cloudconnector_proxy_connections_total"]
        )
        assert summed[(("result", "ok"),)] >= 3 * FLEET

        # One device reconnecting until its new session lands on the other worker: the broker then
        # drops the older session, whose end must not overwrite the newer one's "connected". With
        # one status write a second per worker, the older worker has just spent its write on
        # "connected" and writes the end up to a second after the idle worker wrote the new
        # session: the order in which a pod-wide "still this proxy?" test would be fooled.
        def serving() -> dict[str, float]:
            return _per_worker(http, "cloudconnector_proxy_worker_sessions")

        held, older, moved = None, None, False
        for _ in range(30):
            c = Client("meter-1", bind=_ip(1))
            assert c.connect(port) == 0
            wait_for(lambda: sum(serving().values()) == 1, what="one session of meter-1")
            now = next(w for w, v in serving().items() if v)
            if older is not None:
                older.disconnects.get(timeout=10)  # the older session ended
                older.close()
            moved = held is not None and now != held
            held, older = now, c
            if moved:
                break
            wait_for(lambda: "meter-0001" in _connected(site), what="meter-1 shown connected")
        assert moved and older is not None
        time.sleep(2.5)  # the older worker's end of session is written by then, or dropped
        assert _connections(site)["meter-0001"]["connected"] is True
        older.close()
        wait_for(lambda: "meter-0001" not in _connected(site), what="meter-1 shown disconnected")

        # Everyone connected, shown connected; then one worker is killed.
        for i in range(FLEET):
            clients[i] = Client(f"meter-{i}", bind=_ip(i))
            assert clients[i].connect(port) == 0, i
        names = {f"meter-{i:04d}" for i in range(FLEET)}
        wait_for(lambda: _connected(site) == names, timeout=30, what="every device shown connected")
        sessions = _per_worker(http, "cloudconnector_proxy_worker_sessions")
        assert sum(sessions.values()) == FLEET, sessions
        dead, other = ("0", "1") if sessions["0"] else ("1", "0")  # one that serves devices
        victim = pids[dead]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: _pids(http).get(dead) not in (None, victim), timeout=30, what="the worker back")
        assert _pids(http)[other] == pids[other]
        assert _per_worker(http, "cloudconnector_proxy_worker_restarts_total") == {dead: 1.0, other: 0.0}
        wait_for(lambda: _ready(http) == 200, timeout=30, what="ready again")
        # The dead worker's devices: disconnected by the kernel, shown so by the parent; the other
        # worker's stay connected.
        wait_for(
            lambda: sum(not c.disconnects.empty() for c in clients.values()) == sessions[dead],
            what="the dead worker's devices cut",
        )
        cut = [i for i, c in clients.items() if not c.disconnects.empty()]
        gone = {f"meter-{i:04d}" for i in cut}
        wait_for(lambda: _connected(site) == names - gone, timeout=30, what="the dead worker's devices off")
        for i in cut:  # they reconnect, through whichever worker the kernel picks
            clients[i].close()
            clients[i] = Client(f"meter-{i}", bind=_ip(i))
            assert clients[i].connect(port) == 0, i
        wait_for(lambda: _connected(site) == names, timeout=30, what="reconnected devices shown connected")
        before = _per_worker(http, "cloudconnector_proxy_worker_connections_total")

        # A removed Device: its session ends and every worker refuses it.
        site.write(
            "devices.yaml",
            [
                site.device(
                    i, ip=_ip(i), cloudId=f"meter-{i}", credentialsSecretRef={"name": f"meter-{i}-tls"}
                )
                for i in range(1, FLEET)
            ],
        )
        wait_for(lambda: len(phases(site)) == FLEET - 1, timeout=60, what="meter-0000 removed")
        wait_for(lambda: not clients[0].disconnects.empty(), timeout=30, what="its session ended")
        refused = []
        for _ in range(16):
            c = Client("meter-0", bind=_ip(0))
            try:
                refused.append(c.connect(port, timeout=5))
            finally:
                c.close()
        assert refused and all(rc != 0 for rc in refused), refused
        after = _per_worker(http, "cloudconnector_proxy_worker_connections_total")
        assert after["0"] > before["0"] and after["1"] > before["1"], (before, after)

        # SIGTERM: every worker drains, the devices are shown disconnected, nothing is left running.
        alive = {f"meter-{i:04d}" for i in range(1, FLEET)}
        assert _connected(site) == alive
        workers = list(_pids(http).values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(_alive(pid) for pid in workers)
        assert all(not clients[i].disconnects.empty() for i in range(1, FLEET))
        assert _connected(site) == set() and set(_connections(site)) >= alive
    finally:
        for c in clients.values():
            c.close()
        stop(proc)
        log.close()
        print((tmp_path / "run.log").read_text()[-4000:])


def test_worker_count_follows_the_cgroup_quota(tmp_path: Path) -> None:
    cores = available_cores(tmp_path)  # no cgroup files: the affinity mask alone
    assert cores == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cores(tmp_path) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == cores
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    assert worker_count(3) == 3 and worker_count(None) == available_cores()


@pytest.mark.parametrize(("value", "workers"), [(None, 2), ("auto", None), (4, 4), (1, 1)])
def test_chart_sets_the_worker_count(value: object, workers: int | None) -> None:
    from cloudconnector.proxy.config import from_mapping
    from tests.helm.chart import env_of, load, render

    values = {} if value is None else {"proxy": {"workers": value}}
    rendered = render(load(), values)
    deployment = rendered.one("Deployment", "cc-cloud-connector-proxy")
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    only = {"CC_PROXY_TLS_PORT": "off", "CC_PROXY_WORKERS": env["CC_PROXY_WORKERS"]}
    assert from_mapping(only).workers == workers


@pytest.mark.parametrize("value", [0, "many", 2.5])
def test_chart_refuses_a_bad_worker_count(value: object) -> None:
    import helm_python

    from tests.helm.chart import load

    with pytest.raises(helm_python.HelmValuesError, match="/proxy/workers"):
        load().validate_schema({"proxy": {"workers": value}})


async def test_cloud_connector_proxy_with_two_workers(
    kmock: kmocklib.KubernetesEmulator,
    pki: Pki,
    broker: Mosquitto,
    bao: Bao,
    stores: tuple[VaultKeyStore, VaultKeyStore],
    admin: Client,
) -> None:
    """The Deployment's command: the parent watches (kmock here) and the workers read credentials
    from OpenBao with the proxy's token; both serve, a deleted Device is refused by both, and
    SIGTERM drains them."""
    serve_crds(kmock)
    server = str(kmock.url).rstrip("/")
    kube = KubeClient(KubeConfig(server=server))
    ns = f"w-{uuid.uuid4().hex[:6]}"
    ep_spec = {"type": "AwsIotCore", "aws": {"region": "eu-west-1"}, "caCertificate": pki.ca.cert_pem}
    ep_status = {"phase": "Ready", "host": "localhost", "port": broker.port}
    await kube.create(ENDPOINTS, ns, body("Endpoint", ns, "aws", ep_spec, ep_status))
    await kube.create(GROUPS, ns, body("Group", ns, "g", {"endpointRef": {"name": "aws"}}, {}))
    writer, reader = stores
    for i in range(4):
        thing = f"fleet_w-{i}"
        spec = {"group": "g", "sim": {"iccid": f"89353018888888880{i:02d}"}, "ip": f"127.22.0.{10 + i}"}
        status = {"phase": "Ready", "endpoint": "aws", "cloudId": thing, "certificateId": "c1"}
        await kube.create(DEVICES, ns, body("Device", ns, f"w-{i}", {**spec, "cloudId": thing}, status))
        issued = pki.ca.issue(thing, client=True)
        await writer.put(ObjectRef(ns, f"w-{i}"), KeyMaterial(issued.cert_pem, issued.key_pem), {})
    mqtt_port, http = free_port(), free_port()
    env = {
        **os.environ,
        "CLOUDCONNECTOR_K8S_SERVER": server,
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": reader.config.token or "",
        "CC_PROXY_BIND": "127.0.0.1",
        "CC_PROXY_MQTT_PORT": str(mqtt_port),
        "CC_PROXY_TLS_PORT": "off",
        "CC_PROXY_HTTP_BIND": "127.0.0.1",
        "CC_PROXY_HTTP_PORT": str(http),
        "CC_PROXY_DRAIN_SECONDS": "0.2",
    }
    cmd = ["-m", "cloudconnector.proxy.main", "--namespace", ns, "--workers", "2"]
    proc = await asyncio.create_subprocess_exec(sys.executable, *cmd, env=env, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_for, lambda: _ready(http) == 200, 30.0, "proxy ready")
        pids = await asyncio.to_thread(_pids, http)
        assert sorted(pids) == ["0", "1"]
        admin.subscribe("fleet_w-0/#", 1)

        def connect_all() -> None:
            for _ in range(3):
                for i in range(4):
                    c = Client("anything", bind=f"127.22.0.{10 + i}")
                    try:
                        assert c.connect(mqtt_port) == 0, i
                        c.publish(f"fleet_w-{i}/up", b"x", 1)
                    finally:
                        c.close()

        await asyncio.to_thread(connect_all)
        assert (await asyncio.to_thread(admin.expect)).payload == b"x"
        taken = await asyncio.to_thread(_per_worker, http, "cloudconnector_proxy_worker_connections_total")
        assert taken["0"] >= 1 and taken["1"] >= 1 and sum(taken.values()) >= 12, taken

        await kube.request("DELETE", DEVICES.path(ns, "w-0"))

        def refused_by_both() -> bool:
            before = _per_worker(http, "cloudconnector_proxy_worker_connections_total")
            codes = []
            for _ in range(16):
                c = Client("anything", bind="127.22.0.10")
                try:
                    codes.append(c.connect(mqtt_port, timeout=5))
                except Exception:
                    codes.append(-1)  # closed before the handshake: also refused
                finally:
                    c.close()
            after = _per_worker(http, "cloudconnector_proxy_worker_connections_total")
            return all(code != 0 for code in codes) and all(after[w] > before[w] for w in after)

        await asyncio.to_thread(wait_for, refused_by_both, 20.0, "w-0 refused by both workers")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not any(_alive(pid) for pid in pids.values())
    finally:
        await kube.aclose()
        if proc.returncode is None:
            proc.kill()
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
    assert logs.count('"message": "proxy listening"') >= 2  # the parent's line and each worker's
    assert '"worker": 1' in logs and "PRIVATE KEY" not in logs
