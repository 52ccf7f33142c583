"""Benchmark: provision 300 devices against moto with the Endpoint limited to 50 devices/s.

One command, prints results (not a test):  python bench/provision.py [--devices 300] [--rate 50]

Everything is real and local: kmock as the API server, the operator as a subprocess
(``python -m cloudconnector.operator.main``), moto server for AWS IoT, OpenBao for the keys.
Reports the achieved provisioning rate against the limit, the time until every Device is Ready,
and the operator's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import hvac
import kmock as kmocklib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudconnector import api
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, bootstrap
from cloudconnector.kube import SECRETS, KubeClient, KubeConfig, Resource
from tests.operator.apiserver import ApiServer, register_crds
from tests.support.procs import run_bao, run_moto

ENDPOINTS = Resource(api.GROUP, api.VERSION, api.ENDPOINTS)
GROUPS = Resource(api.GROUP, api.VERSION, api.GROUPS)
DEVICES = Resource(api.GROUP, api.VERSION, api.DEVICES)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def obj(kind: str, ns: str, name: str, spec: dict) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "generation": 1},
        "spec": spec,
    }


async def run(devices: int, rate: float, limit_s: float) -> int:
    with ExitStack() as stack:
        bao = stack.enter_context(run_bao())
        moto = stack.enter_context(run_moto())
        root = hvac.Client(url=bao.url, token=bao.token)
        bootstrap(root)
        token = root.auth.token.create(policies=[OPERATOR_POLICY], no_default_policy=True, ttl="2h")
        log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-"))) / "operator.log"
        ns = "bench"
        async with ApiServer(keep_requests=16) as server, kmocklib.Server(server):
            register_crds(server)
            url = str(server.url).rstrip("/")
            kube = KubeClient(KubeConfig(server=url))
            keys = {"AWS_ACCESS_KEY_ID": "AKIDBENCH", "AWS_SECRET_ACCESS_KEY": "bench-only"}
            secret = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
            await kube.create(
                SECRETS,
                ns,
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "aws", "namespace": ns},
                    "data": secret,
                },
            )
            aws = {"region": "eu-west-1", "endpointUrl": moto.url, "credentialsSecretRef": {"name": "aws"}}
            spec = {"type": "AwsIotCore", "rateLimit": {"devicesPerSecond": rate}, "aws": aws}
            await kube.create(ENDPOINTS, ns, obj("Endpoint", ns, "aws", spec))
            await kube.create(GROUPS, ns, obj("Group", ns, "fleet", {"endpointRef": {"name": "aws"}}))
            for i in range(devices):
                sim = {"iccid": f"8935301{i:012d}", "imsi": f"23430{i:010d}"}
                dspec = {
                    "group": "fleet",
                    "sim": sim,
                    "ip": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}",
                }
                await kube.create(DEVICES, ns, obj("Device", ns, f"meter-{i:04d}", dspec))

            env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AWS_"))}
            env.update(
                CLOUDCONNECTOR_K8S_SERVER=url,
                CLOUDCONNECTOR_NAMESPACES=ns,
                CLOUDCONNECTOR_PEERING="off",
                CLOUDCONNECTOR_NAMESPACE_SCANNING="off",
                VAULT_ADDR=bao.url,
                VAULT_TOKEN=token["auth"]["client_token"],
            )
            out = log.open("ab")
            started = time.monotonic()
            proc = subprocess.Popen(  # noqa: ASYNC220 - a child that lives through the whole run
                [sys.executable, "-m", "cloudconnector.operator.main"], env=env, stdout=out, stderr=out
            )
            ready_at: dict[str, float] = {}
            rss = 0.0
            try:
                while len(ready_at) < devices and time.monotonic() - started < limit_s:
                    await asyncio.sleep(0.25)
                    now = time.monotonic()
                    for item in await kube.list(DEVICES, ns):
                        if (item.get("status") or {}).get("phase") == "Ready":
                            ready_at.setdefault(item["metadata"]["name"], now)
                    rss = max(rss, peak_rss_mib(proc.pid))
                rss = max(rss, peak_rss_mib(proc.pid))
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                await kube.aclose()

            import boto3

            iot = boto3.client(
                "iot",
                region_name="eu-west-1",
                endpoint_url=moto.url,
                aws_access_key_id="AKIDBENCH",
                aws_secret_access_key="bench-only",
            )
            things = sum(len(page["things"]) for page in iot.get_paginator("list_things").paginate())
            cert_count = sum(
                len(page["certificates"]) for page in iot.get_paginator("list_certificates").paginate()
            )

        times = sorted(ready_at.values())
        print(f"devices            : {len(ready_at)}/{devices} Ready")
        if len(times) >= 2:
            first, last = times[0], times[-1]
            achieved = (len(times) - 1) / (last - first) if last > first else float("inf")
            print(f"limit              : {rate:.1f} devices/s")
            print(f"achieved           : {achieved:.1f} devices/s (first to last Ready)")
            overall = len(times) / (last - started)
            print(f"overall            : {overall:.1f} devices/s (operator start to last Ready)")
            print(f"time to first Ready: {first - started:.1f} s")
            print(f"time to all Ready  : {last - started:.1f} s")
        print(f"operator peak RSS  : {rss:.1f} MiB")
        print(f"moto               : {things} things, {cert_count} certificates (expected {devices} each)")
        if os.environ.get("BENCH_LOG"):
            shutil.copyfile(log, os.environ["BENCH_LOG"])
        if len(ready_at) < devices:
            print("not all devices became Ready; set BENCH_LOG=<file> to keep the operator log")
            return 1
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    return asyncio.run(run(args.devices, args.rate, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
