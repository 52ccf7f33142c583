"""Credential fetch from a real OpenBao: what the proxy pays for Vault on every device connection.

One command, prints a table (not a test):

    python bench/vault_fetch.py --devices 200 --fetches 2000

It starts ``bao server -dev`` (OpenBao, Vault's API), bootstraps the project's policies, stores
``--devices`` credentials with the operator's role, and then, with the proxy's read-only token,
fetches them as the proxy does when a device connects: the KV v2 record, then a transit decrypt
of the private key (two HTTP requests). For each client it reports:

- latency of one fetch on an idle system, sequential: p50 / p95 / p99;
- fetches per second at concurrency 1, 16, 64 and 256: the ceiling that Vault access puts on the
  proxy's connection set-up rate (every new device connection fetches once);
- CPU milliseconds per fetch in this process (the proxy's share) and in OpenBao.

Clients:

- ``aiohttp (shipped)``: ``VaultKeyStore.get`` as the proxy runs it: both requests sent natively on
  the event loop over one kept aiohttp session (``keystore/vault_http.py``);
- ``hvac/threads (before)``: the same ``get`` with both requests sent the way they were before
  (and the operator's writes still are): hvac's raw adapter on requests, each request in a worker
  thread (``asyncio.to_thread``), at most 16 at once.

Every client's result is checked against the stored certificate, so a fast wrong answer cannot win.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # bao

from cloudconnector.keystore.base import KeyMaterial  # noqa: E402
from cloudconnector.keystore.vault import VaultKeyStore  # noqa: E402
from cloudconnector.keystore.vault_config import VaultConfig  # noqa: E402
from cloudconnector.keystore.vault_session import VaultSession  # noqa: E402
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY  # noqa: E402
from cloudconnector.model import ObjectRef  # noqa: E402
from tests.support.pki import CA  # noqa: E402
from tests.support.procs import run_bao  # noqa: E402
from tests.support.vault import bootstrapped, mint_token  # noqa: E402

CONCURRENCY = (1, 16, 64, 256)
Fetch = Callable[[ObjectRef], Awaitable[KeyMaterial]]


class ThreadedReads(VaultSession):
    """The proxy's reads as they were sent before: through hvac, a worker thread per request."""

    async def read(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        return await self.request(method, path, payload)


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    p50: float
    p95: float
    p99: float
    rates: dict[int, float]
    cpu_self_ms: float
    cpu_bao_ms: float


async def _measure(
    name: str,
    fetch: Fetch,
    devices: list[ObjectRef],
    expected: dict[ObjectRef, str],
    fetches: int,
    bao_pid: int,
) -> Result:
    async def one(device: ObjectRef) -> None:
        material = await fetch(device)
        if material.certificate_pem != expected[device] or b"PRIVATE KEY" not in material.private_key_pem:
            raise AssertionError(f"{name}: wrong credentials for {device}")

    for device in devices[:20]:  # warm-up: connections, token, code paths
        await one(device)
    latencies = []
    for i in range(min(fetches, 500)):
        started = time.perf_counter()
        await one(devices[i % len(devices)])
        latencies.append((time.perf_counter() - started) * 1000)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    rates: dict[int, float] = {}
    cpu_self = cpu_bao = 0.0
    for concurrency in CONCURRENCY:
        queue = iter(range(fetches))

        async def worker(queue: Iterator[int]) -> None:
            for i in queue:
                await one(devices[i % len(devices)])

        self0, bao0, started = time.process_time(), _cpu_of(bao_pid), time.perf_counter()
        await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        rates[concurrency] = fetches / elapsed
        if concurrency == 64:
            cpu_self = (time.process_time() - self0) * 1000 / fetches
            cpu_bao = (_cpu_of(bao_pid) - bao0) * 1000 / fetches
    return Result(name, q[49], q[94], q[98], rates, cpu_self, cpu_bao)


async def _store(writer: VaultKeyStore, count: int) -> tuple[list[ObjectRef], dict[ObjectRef, str]]:
    ca = CA()
    devices = [ObjectRef("bench", f"dev-{i:04d}") for i in range(count)]
    expected: dict[ObjectRef, str] = {}
    semaphore = asyncio.Semaphore(16)

    async def put(device: ObjectRef) -> None:
        issued = ca.issue(device.name, client=True)
        async with semaphore:
            await writer.put(device, KeyMaterial(issued.cert_pem, issued.key_pem), {})
        expected[device] = issued.cert_pem

    await asyncio.gather(*(put(d) for d in devices))
    return devices, expected


async def run(count: int, fetches: int) -> list[Result]:
    with run_bao() as bao:
        root = bootstrapped(bao)
        operator = VaultConfig(address=bao.url, token=mint_token(root, OPERATOR_POLICY))
        proxy = VaultConfig(address=bao.url, token=mint_token(root, PROXY_POLICY))
        writer = VaultKeyStore(operator)
        devices, expected = await _store(writer, count)
        writer.close()
        results = []
        for name, session in (
            ("aiohttp (shipped)", VaultSession(proxy)),
            ("hvac/threads (before)", ThreadedReads(proxy)),
        ):
            store = VaultKeyStore(proxy, session=session)
            try:
                results.append(await _measure(name, store.get, devices, expected, fetches, bao.proc.pid))
            finally:
                await store.aclose()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--fetches", type=int, default=2000, help="fetches per concurrency level")
    args = parser.parse_args()
    results = uvloop.run(run(args.devices, args.fetches))
    print(f"\ncredential fetch from OpenBao (KV v2 read + transit decrypt), {args.devices} devices")
    header = f"{'client':<22} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    header += (
        "".join(f" {f'c={c} /s':>9}" for c in CONCURRENCY) + f" {'cpu ms/fetch':>13} {'bao ms/fetch':>13}"
    )
    print(header)
    for r in results:
        line = f"{r.name:<22} {r.p50:>7.2f} {r.p95:>7.2f} {r.p99:>7.2f}"
        line += "".join(f" {r.rates[c]:>9.0f}" for c in CONCURRENCY)
        print(line + f" {r.cpu_self_ms:>13.2f} {r.cpu_bao_ms:>13.2f}")


if __name__ == "__main__":
    main()
