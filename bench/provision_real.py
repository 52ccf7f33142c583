"""Benchmark: provisioning as production sees it, on a real API server with cloud latency.

One command, prints results (not a test):

    python bench/provision_real.py [--devices 900] [--rate 15] [--latency 0.15] [--throttle 0.0]

What runs, all real and local: a kube-apiserver + etcd (``tests/support/kube.py``'s
``real_cluster()``, which starts ``../shared/k8s/start`` and installs the CRDs), the operator as a
process (``python -m cloudconnector.operator.main``, logged in with the cluster's *admin*
kubeconfig, not the chart's ServiceAccount: RBAC is tested in tests/e2e, not here), moto for AWS
IoT behind the latency relay (``cloudconnector.testing.latency_relay``: default 150 ms +- 30 ms
per request, optionally a share of requests answered ``ThrottlingException``), and OpenBao behind
a second relay that only counts (no latency unless ``--vault-latency``).

Phases: (1) the Endpoint is made Ready, then all Devices are created at once (8 client threads)
and the bench waits until every one is Ready; (2) the operator is stopped and started again with
every Device Ready, and the bench waits until it is idle; (3) with ``--delete``, every Device is
deleted at once, and moto and Vault are audited for anything left.

How things are counted:
- cloud calls: requests the AWS relay saw (throttled answers included, listed apart);
- Vault requests: requests the Vault relay saw; writes are every method but GET;
- API-server requests: the server's own ``apiserver_request_total`` counter (from ``/metrics``),
  before and after each phase, minus the requests the bench itself made (its Device creations and
  deletions, counted as it makes them; its watch is opened before the first snapshot);
- operator CPU and peak RSS from ``/proc/<pid>`` (utime + stime, VmHWM); the same CPU figure for
  moto, OpenBao and the kube-apiserver, to show where the machine's two cores went.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudconnector.keystore.vault_setup import OPERATOR_POLICY
from cloudconnector.testing.latency_relay import LatencyRelay, relay_in_thread
from tests.support.kube import ApiError, Kube, real_cluster
from tests.support.procs import Moto, free_port, port_open, run_bao, run_moto, stop, wait_for
from tests.support.vault import bootstrapped, mint_token

API = "cloudconnector.io/v1alpha1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')
OWN_RESOURCES = {"devices", "groups", "endpoints", "events", "secrets", "leases", "namespaces"}


# -- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def api_requests(kube: Kube) -> Counter[str]:
    """The API server's request counter, by verb and resource[/subresource]."""
    req = urllib.request.Request(kube.server + "/metrics")
    with urllib.request.urlopen(req, context=kube.admin_ssl, timeout=30) as answer:
        text = answer.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m["labels"]))
        resource = labels.get("resource", "")
        if resource not in OWN_RESOURCES:
            continue  # the server's own loops (apiservices, leases of its controllers ...)
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        counts[f"{labels.get('verb')} {resource}"] += int(float(m["value"]))
    return counts


@dataclass
class Snapshot:
    at: float
    api: Counter[str]
    cloud: Counter[str]
    throttled: int
    vault: Counter[str]
    cpu: dict[str, float]
    machine: tuple[float, float]


@dataclass
class Rig:
    kube: Kube
    aws: LatencyRelay
    vault: LatencyRelay
    pids: dict[str, int]
    bench_api: Counter[str] = field(default_factory=Counter)  # the bench's own requests

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time.monotonic(),
            api_requests(self.kube),
            self.aws.stats.snapshot(),
            sum(self.aws.stats.throttled.values()),
            self.vault.stats.snapshot(),
            {name: cpu_seconds(pid) for name, pid in self.pids.items()},
            machine_busy(),
        )


@dataclass
class Delta:
    seconds: float
    api: Counter[str]
    cloud: Counter[str]
    throttled: int
    vault: Counter[str]
    cpu: dict[str, float]
    machine_cores: float

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot, bench_api: Counter[str]) -> Delta:
        api = b.api.copy()
        api.subtract(a.api)
        api.subtract(bench_api)
        busy = (b.machine[0] - a.machine[0]) / max(1.0, b.machine[1] - a.machine[1])
        return cls(
            b.at - a.at,
            +api,
            _minus(b.cloud, a.cloud),
            b.throttled - a.throttled,
            _minus(b.vault, a.vault),
            {k: b.cpu[k] - a.cpu.get(k, 0.0) for k in b.cpu},
            busy * (os.cpu_count() or 1),
        )


def _minus(b: Counter[str], a: Counter[str]) -> Counter[str]:
    out = b.copy()
    out.subtract(a)
    return +out


class Profiles:
    """py-spy sampling the operator and moto during a phase (``--profile``; py-spy on PATH)."""

    def __init__(self, directory: Path | None, pids: dict[str, int]) -> None:
        self.directory = directory
        self.pids = pids
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tag = ""

    def start(self, names: tuple[str, ...] = ("operator", "moto"), tag: str = "") -> None:
        self.tag = tag
        exe = shutil.which("py-spy")
        if self.directory is None or exe is None:
            if self.directory is not None:
                print("--profile needs py-spy on PATH; no profile taken")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            out = self.directory / f"{name}{tag}.txt"
            # --gil: only the thread holding the GIL is sampled, so shares are of Python CPU time,
            # not of threads waiting for an answer.
            argv = [exe, "record", "-p", str(self.pids[name]), "-o", str(out), "-f", "raw", "-r", "50"]
            argv += ["--nonblocking", "--gil"]
            self.procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for name, proc in self.procs.items():
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            assert self.directory is not None
            out = self.directory / f"{name}{self.tag}.txt"
            if out.exists():
                print(f"profile of {name:<9}: {summarize(out)}")
        self.procs.clear()


def _package(frame: str) -> str:
    """``send (botocore/endpoint.py:12)`` -> ``botocore``; ``f (cloudconnector/core/x.py:1)`` ->
    ``cloudconnector.core``; ``f (socket.py:9)`` -> ``socket``."""
    path = frame.rsplit(" (", 1)[-1].rsplit(":", 1)[0]
    if path.startswith("<frozen "):
        return path.removeprefix("<frozen ").rstrip(">")
    parts = path.split("/")
    if parts[0] == "cloudconnector" and len(parts) > 2:
        return f"cloudconnector.{parts[1]}"
    return parts[0].removesuffix(".py")


# Frames at the root of nearly every stack: they say nothing about where the time goes.
ROOTS = {"runpy", "threading", "concurrent", "socketserver", "asyncio", "uvloop", "kopf", "?"}


def summarize(path: Path, limit: int = 10) -> str:
    """Share of samples by the package of the innermost frame, and by packages anywhere on the stack."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf[_package(frames[-1])] += n
        for pkg in {_package(f) for f in frames}:
            inclusive[pkg] += n
    if not total:
        return "no samples"
    own = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in leaf.most_common(limit))
    shown = [(k, v) for k, v in inclusive.most_common() if k not in ROOTS][:limit]
    incl = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in shown)
    kopf = 100 * inclusive["kopf"] / total
    return f"{total} samples; innermost frame: {own}\n    on the stack: {incl}; kopf {kopf:.0f}%"


@contextlib.contextmanager
def pooled_moto() -> Iterator[Moto]:
    """moto with pre-made RSA keys (bench/moto_pooled_keys.py), else as tests/support starts it."""
    port = free_port()
    script = Path(__file__).with_name("moto_pooled_keys.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--keys", "32", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), timeout=60, what="moto")
        yield Moto(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)


# -- the cluster side ------------------------------------------------------------------------


class DeviceWatch:
    """Follows the namespace's Devices in a thread: when each was first Ready, and which are gone."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.ready: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.gone: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._stop = threading.Event()
        self._version = ""
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="device-watch")

    def start(self) -> DeviceWatch:
        listing = self.kube.request("GET", f"/apis/{API}/namespaces/{self.namespace}/devices")
        self._version = listing["metadata"]["resourceVersion"]
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            path = (
                f"/apis/{API}/namespaces/{self.namespace}/devices?watch=1&allowWatchBookmarks=true"
                f"&resourceVersion={self._version}&timeoutSeconds=600"
            )
            req = urllib.request.Request(self.kube.server + path)
            try:
                with urllib.request.urlopen(req, context=self.kube.admin_ssl, timeout=700) as stream:
                    self._started.set()
                    for line in stream:
                        if self._stop.is_set():
                            return
                        self._event(json.loads(line))
            except (OSError, ValueError):
                time.sleep(0.5)

    def _event(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        self._version = meta.get("resourceVersion") or self._version
        if event.get("type") == "BOOKMARK":
            return
        name = meta.get("name", "")
        now = time.monotonic()
        if event.get("type") == "DELETED":
            self.gone.setdefault(name, now)
            return
        status = obj.get("status") or {}
        phase = str(status.get("phase") or "")
        self.phase[name] = phase
        if phase == "Ready":
            self.ready.setdefault(name, now)
        elif phase == "Failed":
            self.failed[name] = str(status.get("message", ""))[:200]


def setup_namespace(kube: Kube, moto_url: str, rate: float) -> str:
    ns = kube.namespace("bench")
    secret = {"AWS_ACCESS_KEY_ID": "AKIDBENCHONLY", "AWS_SECRET_ACCESS_KEY": "bench-only-not-a-secret"}
    kube.request(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "aws", "namespace": ns},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        },
    )
    aws = {"region": "eu-west-1", "endpointUrl": moto_url, "credentialsSecretRef": {"name": "aws"}}
    kube.create(
        {
            "apiVersion": API,
            "kind": "Endpoint",
            "metadata": {"name": "aws", "namespace": ns},
            "spec": {"type": "AwsIotCore", "rateLimit": {"devicesPerSecond": rate}, "aws": aws},
        }
    )
    kube.create(
        {
            "apiVersion": API,
            "kind": "Group",
            "metadata": {"name": "fleet", "namespace": ns},
            "spec": {"endpointRef": {"name": "aws"}},
        }
    )
    return ns


def device(ns: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Device",
        "metadata": {"name": f"meter-{i:05d}", "namespace": ns},
        "spec": {
            "group": "fleet",
            "sim": {"iccid": f"8935301{i:012d}", "imsi": f"23430{i:010d}"},
            "ip": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}",
        },
    }


def create_all(kube: Kube, ns: str, count: int) -> dict[str, float]:
    """Create the Devices as fast as 8 clients can; returns when each creation was answered."""
    created: dict[str, float] = {}

    def one(i: int) -> None:
        body = device(ns, i)
        kube.create(body)
        created[body["metadata"]["name"]] = time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
    return created


def seed_ready(kube: Kube, ns: str, template: str, indexes: range) -> None:
    """Devices that look exactly like ``template`` after the operator provisioned it (status,
    finalizer, kopf's annotations) but with their own name, SIM and IP: a restart with many Ready
    Devices without provisioning each of them first. Their cloud identities do not exist; a
    restart must not look at them, which is what is measured."""
    body = kube.get("Device", ns, template)
    spec = body["spec"]
    old = {
        "name": template,
        "iccid": spec["sim"]["iccid"],
        "imsi": spec["sim"].get("imsi", ""),
        "ip": spec["ip"],
    }
    meta = body["metadata"]
    text = json.dumps(
        {
            "apiVersion": API,
            "kind": "Device",
            "metadata": {
                "name": template,
                "namespace": ns,
                "finalizers": meta.get("finalizers", []),
                "annotations": meta.get("annotations", {}),
            },
            "spec": spec,
            "status": body["status"],
        }
    )

    def one(i: int) -> None:
        new = device(ns, i)
        values = {
            "name": new["metadata"]["name"],
            "iccid": new["spec"]["sim"]["iccid"],
            "imsi": new["spec"]["sim"]["imsi"],
            "ip": new["spec"]["ip"],
        }
        copy = text
        for key, value in old.items():
            if value:
                copy = re.sub(rf"(?<![\d.]){re.escape(value)}(?![\d.])", values[key], copy)
        obj = json.loads(copy)
        status = obj.pop("status")
        kube.create(obj)
        kube.request(
            "PATCH",
            kube.path("Device", ns, values["name"]) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, indexes))


class Operator:
    def __init__(self, kube: Kube, ns: str, vault_url: str, token: str, log: Path) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "AWS_", "KUBE", "CLOUDCONNECTOR_"))
        }
        env.update(
            KUBECONFIG=str(kube.kubeconfig),
            CLOUDCONNECTOR_NAMESPACES=ns,
            CLOUDCONNECTOR_PEERING="off",
            CLOUDCONNECTOR_NAMESPACE_SCANNING="off",
            VAULT_ADDR=vault_url,
            VAULT_TOKEN=token,
            AWS_EC2_METADATA_DISABLED="true",
        )
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudconnector.operator.main"], env=self.env, stdout=out, stderr=out
        )
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- reporting -------------------------------------------------------------------------------


def per(n: float, count: int) -> str:
    return f"{n / count:.2f}" if count else "-"


def top(counts: Counter[str], count: int, limit: int = 8) -> str:
    return ", ".join(f"{k} {v / count:.2f}" for k, v in counts.most_common(limit)) or "none"


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    if len(xs) < 2:
        return float("nan")
    return statistics.correlation(rx, ry)


def report_provisioning(
    args: argparse.Namespace, created: dict[str, float], ready: dict[str, float], d: Delta
) -> None:
    n = len(created)
    arrival = sorted(created, key=created.__getitem__)
    t0 = created[arrival[0]]
    times = sorted(ready.values())
    print(f"devices Ready          : {len(ready)}/{n}")
    if len(times) >= 10:
        lo, hi = int(0.1 * len(times)), int(0.9 * len(times)) - 1
        steady = (hi - lo) / (times[hi] - times[lo]) if times[hi] > times[lo] else float("inf")
        print(
            f"steady rate (10-90 %)  : {steady:.2f} devices/s = {100 * steady / args.rate:.0f} % "
            f"of the cap {args.rate:g}/s"
        )
    if times:
        print(
            f"whole batch            : {len(times) / (times[-1] - t0):.2f} devices/s "
            "(first create to last Ready)"
        )
        print(f"creating all Devices   : {created[arrival[-1]] - t0:.1f} s")
        print(f"time to first Ready    : {times[0] - t0:.2f} s")
        print(f"time to all Ready      : {times[-1] - t0:.1f} s (cap time {n / args.rate:.1f} s)")
    both = [name for name in arrival if name in ready]
    if len(both) >= 2:
        rho = spearman([created[x] for x in both], [ready[x] for x in both])
        own = min(ready[x] - created[x] for x in both)
        late = [ready[x] - (t0 + k / args.rate + own) for k, x in enumerate(arrival) if x in ready]
        late.sort()
        print(f"Ready vs arrival order : rank correlation {rho:.3f}")
        p50, p95 = late[len(late) // 2], late[int(0.95 * (len(late) - 1))]
        print(
            f"N-th Ready vs N/cap+own: own time {own:.2f} s; later than that by p50 "
            f"{p50:.2f} s, p95 {p95:.2f} s, max {late[-1]:.2f} s"
        )
    print_counts(d, n)


def print_counts(d: Delta, n: int) -> None:
    cloud = sum(d.cloud.values())
    print(f"cloud calls per device : {per(cloud, n)} ({d.throttled} answered ThrottlingException)")
    print(f"  by call              : {top(d.cloud, n)}")
    vault_writes = sum(v for k, v in d.vault.items() if not k.startswith("GET "))
    print(f"Vault requests/device  : {per(sum(d.vault.values()), n)} ({per(vault_writes, n)} writes)")
    print(f"  by request           : {top(d.vault, n)}")
    status_writes = sum(v for k, v in d.api.items() if k.startswith("PATCH devices/status"))
    print(f"API requests per device: {per(sum(d.api.values()), n)} (status patches {per(status_writes, n)})")
    print(f"  by request           : {top(d.api, n, 10)}")
    print(
        "CPU seconds per device : "
        + ", ".join(f"{k} {per(v, n)}" for k, v in d.cpu.items())
        + f"  (machine busy {d.machine_cores:.2f} of {os.cpu_count()} cores over {d.seconds:.0f} s)"
    )


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ApiError, OSError):
            if check():
                return True
        time.sleep(interval)
    print(f"timed out after {timeout:.0f} s waiting for {what}")
    return False


def wait_ready(watch: DeviceWatch, count: int, timeout: float, stall: float) -> None:
    """Until every Device is Ready (or Failed), or none became Ready for ``stall`` seconds."""
    deadline = time.monotonic() + timeout
    last, seen = time.monotonic(), 0
    while time.monotonic() < deadline:
        done = len(watch.ready) + len(watch.failed)
        if done >= count:
            return
        if done != seen:
            last, seen = time.monotonic(), done
        elif time.monotonic() - last > stall:
            print(f"no Device became Ready for {stall:g} s: {count - done} never did")
            return
        time.sleep(0.5)
    print(f"timed out after {timeout:.0f} s waiting for every Device to be Ready")


def wait_idle(rig: Rig, quiet: float, timeout: float, start: float) -> float:
    """Seconds from ``start`` until the operator's API, cloud and Vault traffic last changed."""
    last_change = start
    previous = None
    while time.monotonic() - start < timeout:
        snap = rig.snapshot()
        key = (sum(snap.api.values()), sum(snap.cloud.values()), sum(snap.vault.values()))
        if key != previous:
            previous, last_change = key, snap.at
        elif snap.at - last_change >= quiet:
            break
        time.sleep(0.25)
    return last_change - start


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        kube = stack.enter_context(real_cluster())
        bao = stack.enter_context(run_bao())
        moto = stack.enter_context(run_moto() if args.moto_keys == "real" else pooled_moto())
        aws = stack.enter_context(
            relay_in_thread(moto.url, latency=args.latency, jitter=args.jitter, throttle_share=args.throttle)
        )
        vault = stack.enter_context(relay_in_thread(bao.url, latency=args.vault_latency, jitter=0.0))
        token = mint_token(bootstrapped(bao), OPERATOR_POLICY, ttl="6h")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-real-")))
        ns = setup_namespace(kube, aws.url, args.rate)
        cluster = kube.workdir / "cluster"
        # "bench": this process, which also runs both relays and the watch.
        pids = {"moto": moto.proc.pid, "bao": bao.proc.pid, "bench": os.getpid()}
        for name in ("apiserver", "etcd"):
            with contextlib.suppress(OSError, ValueError):  # a cluster of CLOUDCONNECTOR_E2E_KUBECONFIG
                pids[name] = int((cluster / f"{name}.pid").read_text())
        operator = Operator(kube, ns, vault.url, token, workdir / "operator.log")
        stack.callback(operator.stop)
        pids = {"operator": operator.start(), **pids}
        rig = Rig(kube, aws, vault, pids)
        print(
            f"# {args.devices} Devices, cap {args.rate:g}/s, AWS latency {args.latency * 1000:.0f} "
            f"+- {args.jitter * 1000:.0f} ms, throttled share {args.throttle:g}, Vault latency "
            f"{args.vault_latency * 1000:.0f} ms; moto keys {args.moto_keys}; operator logged in with "
            f"the admin kubeconfig; {os.cpu_count()} cores"
        )
        ok = wait_until(
            "the Endpoint to be Ready",
            lambda: (kube.get("Endpoint", ns, "aws").get("status") or {}).get("phase") == "Ready",
            60,
        )
        if not ok:
            return fail(operator, args)
        watch = stack.enter_context(_watching(kube, ns))

        print("\n## provisioning")
        profiles = Profiles(args.profile, pids)
        profiles.start()
        before = rig.snapshot()
        created = create_all(kube, ns, args.devices)
        rig.bench_api["POST devices"] += args.devices
        wait_ready(watch, args.devices, args.timeout, stall=args.stall)
        after = rig.snapshot()
        peak = peak_rss_mib(pids["operator"])
        report_provisioning(args, created, dict(watch.ready), Delta.between(before, after, rig.bench_api))
        print(f"operator peak RSS      : {peak:.0f} MiB")
        profiles.stop()
        if watch.failed:
            print(f"Failed devices         : {len(watch.failed)}, e.g. {next(iter(watch.failed.values()))}")
        if len(watch.ready) < 0.99 * args.devices:
            return fail(operator, args)
        if len(watch.ready) < args.devices:
            missing = sorted(name for name in created if name not in watch.ready)
            print(f"never Ready           : {', '.join(missing[:5])} (the restart below picks them up)")

        print("\n## restart with every Device Ready")
        operator.stop()
        total = args.devices
        if args.seed_ready:
            started = time.monotonic()
            seed_ready(kube, ns, f"meter-{0:05d}", range(args.devices, args.devices + args.seed_ready))
            total += args.seed_ready
            print(
                f"seeded Ready Devices   : {args.seed_ready} (copies of a provisioned one's object, with "
                f"its own name, SIM and IP; made while the operator was stopped, "
                f"{time.monotonic() - started:.0f} s)"
            )
            wait_until("the seeded Devices in the watch", lambda: len(watch.ready) >= total, 120)
        rig.bench_api.clear()
        before = rig.snapshot()
        started = time.monotonic()
        rig.pids["operator"] = operator.start()
        before.cpu["operator"] = 0.0  # a new process: all of its CPU time is this phase's
        if args.profile:
            time.sleep(1.0)  # py-spy needs the interpreter up
            profiles.start(("operator",), "-restart")
        idle = wait_idle(rig, quiet=args.quiet, timeout=args.timeout, start=started)
        after = rig.snapshot()
        profiles.stop()
        d = Delta.between(before, after, rig.bench_api)
        still = sum(1 for phase in watch.phase.values() if phase == "Ready")
        print(f"back to idle after     : {idle:.1f} s (no operator traffic for {args.quiet:g} s after that)")
        print(f"Devices still Ready    : {still}/{total}")
        vault_writes = sum(v for k, v in d.vault.items() if not k.startswith("GET "))
        print(f"cloud calls            : {sum(d.cloud.values())} in total")
        print(f"Vault writes           : {vault_writes} in total ({sum(d.vault.values())} requests)")
        print(f"API requests per device: {per(sum(d.api.values()), total)} ({top(d.api, total)})")
        rss = peak_rss_mib(rig.pids["operator"])
        print(f"operator CPU           : {d.cpu['operator']:.1f} s; peak RSS {rss:.0f} MiB")

        if args.delete:
            print("\n## deleting every Device")
            rig.bench_api.clear()
            before = rig.snapshot()
            t0 = time.monotonic()
            kube.request("DELETE", f"/apis/{API}/namespaces/{ns}/devices")
            rig.bench_api["DELETECOLLECTION devices"] += 1
            wait_until("every Device to be gone", lambda: len(watch.gone) >= args.devices, args.timeout)
            after = rig.snapshot()
            if watch.gone:
                last = max(watch.gone.values())
                print(
                    f"all gone after         : {last - t0:.1f} s for {len(watch.gone)}/{args.devices} "
                    f"(cap time {args.devices / args.rate:.1f} s)"
                )
            print_counts(Delta.between(before, after, rig.bench_api), args.devices)
            print(f"audit                  : {audit(moto.url, bao, ns)}")
        if os.environ.get("BENCH_LOG"):
            Path(os.environ["BENCH_LOG"]).write_bytes(operator.log.read_bytes())
        return 0


@contextlib.contextmanager
def _watching(kube: Kube, ns: str) -> Iterator[DeviceWatch]:
    watch = DeviceWatch(kube, ns).start()
    try:
        yield watch
    finally:
        watch.stop()


def audit(moto_url: str, bao: Any, ns: str) -> str:
    """What is left in moto and Vault after every Device was deleted ("clean" when nothing)."""
    import boto3
    import hvac

    iot = boto3.client(
        "iot",
        region_name="eu-west-1",
        endpoint_url=moto_url,
        aws_access_key_id="AKIDBENCHONLY",
        aws_secret_access_key="bench-only-not-a-secret",
    )
    left = {
        "things": sum(len(p["things"]) for p in iot.get_paginator("list_things").paginate()),
        "certificates": sum(
            len(p["certificates"]) for p in iot.get_paginator("list_certificates").paginate()
        ),
        "policies": sum(len(p["policies"]) for p in iot.get_paginator("list_policies").paginate()),
    }
    root = hvac.Client(url=bao.url, token=bao.token)
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        keys = root.secrets.kv.v2.list_secrets(path=f"cloud-connector/{ns}", mount_point="secret")
        left["vault secrets"] = len(keys["data"]["keys"])
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        transit = root.secrets.transit.list_keys()
        left["transit keys"] = sum(1 for k in transit["data"]["keys"] if k.startswith(f"cc-{ns}."))
    found = {k: v for k, v in left.items() if v}
    return "clean" if not found else "LEFT " + ", ".join(f"{v} {k}" for k, v in found.items())


def fail(operator: Operator, args: argparse.Namespace) -> int:
    tail = operator.log.read_text(errors="replace").splitlines()[-15:]
    print("operator log (tail):\n  " + "\n  ".join(tail))
    if os.environ.get("BENCH_LOG"):
        Path(os.environ["BENCH_LOG"]).write_bytes(operator.log.read_bytes())
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=900)
    parser.add_argument("--rate", type=float, default=15.0, help="the Endpoint's devicesPerSecond cap")
    parser.add_argument("--latency", type=float, default=0.15, help="seconds added to each AWS request")
    parser.add_argument("--jitter", type=float, default=0.03, help="+- seconds around that latency")
    parser.add_argument("--throttle", type=float, default=0.0, help="share of AWS requests throttled")
    parser.add_argument("--vault-latency", type=float, default=0.0, help="seconds added per Vault request")
    parser.add_argument("--delete", action="store_true", help="also delete every Device and audit")
    parser.add_argument(
        "--seed-ready",
        type=int,
        default=0,
        help="before the restart, add this many Ready Devices copied from a provisioned one",
    )
    parser.add_argument(
        "--moto-keys",
        choices=("pooled", "real"),
        default="pooled",
        help="pooled: moto's RSA keys come from a pool made at start (bench/moto_pooled_keys.py)",
    )
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles of the provisioning phase")
    parser.add_argument("--stall", type=float, default=30.0, help="give up after this long without progress")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds without traffic that count as idle")
    parser.add_argument("--timeout", type=float, default=0.0, help="per phase (default: 3 x cap time + 60 s)")
    args = parser.parse_args()
    if args.seed_ready and args.delete:
        parser.error("--delete would remove the copied identities' originals: not with --seed-ready")
    if not args.timeout:
        args.timeout = 3 * args.devices / args.rate + 60
    if not math.isfinite(args.rate) or args.rate <= 0:
        parser.error("--rate must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
