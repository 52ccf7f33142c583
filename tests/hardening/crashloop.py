"""The crash-consistency run shared by tests/hardening/test_crash_consistency.py and bench/crash.py.

The operator is SIGKILLed at random moments while it provisions a fleet, and restarted each time,
as when its node dies over and over. When the fleet has settled, :func:`audit` compares what exists
in the cloud (moto's things, certificates and policies) and in Vault (the KV listing and each
record's facts) with the Devices' status: every identity must belong to exactly one Device, and
every Device must be Ready with the identity its status names. The random delays come from a
seed, so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.model import ObjectRef
from tests.operator.conftest import DEVICES, Cluster, Fleet, OperatorProcess, Vault


@dataclass(frozen=True)
class Plan:
    """The size of a run: ``devices`` provisioned at ``rate`` per second, ``kills`` SIGKILLs each
    after a delay drawn uniformly from ``delay`` seconds (counted from the previous restart)."""

    devices: int
    kills: int
    seed: int
    rate: float
    delay: tuple[float, float] = (0.5, 2.0)
    settle_deadline: float = 120.0


@dataclass(frozen=True)
class KillPoint:
    """The fleet as the test last saw it before one kill."""

    after: float
    ready: int
    mid_provisioning: int


@dataclass
class CrashRun:
    plan: Plan
    names: list[str]
    kills: list[KillPoint] = field(default_factory=list)
    settle_s: float = 0.0
    """From the last restart until every Device was Ready."""

    @property
    def kills_while_provisioning(self) -> int:
        return sum(1 for k in self.kills if k.ready < len(self.names))


def _phase(obj: dict[str, Any] | None) -> tuple[str | None, bool]:
    status = (obj or {}).get("status") or {}
    return status.get("phase"), bool(status.get("progress"))


async def _statuses(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every Device's status in one LIST (per-object GETs slow kmock down as its history grows)."""
    items = await cluster.client.list(DEVICES, cluster.namespace)
    return {i["metadata"]["name"]: i.get("status") or {} for i in items}


async def _snapshot(cluster: Cluster) -> tuple[int, int]:
    seen = (await _statuses(cluster)).values()
    ready = sum(1 for s in seen if s.get("phase") == "Ready")
    mid = sum(1 for s in seen if s.get("phase") == "Provisioning" and s.get("progress"))
    return ready, mid


async def _caught_mid_way(cluster: Cluster, total: int, aim: float = 5.0) -> tuple[int, int]:
    """After the random delay, aim the kill: wait (up to ``aim`` seconds) for a device that is
    Provisioning with a progress record. Devices are admitted whole at the rate limit and each
    spends only a moment between its checkpoints, so a kill at a purely random time would mostly
    land between devices and prove little."""
    loop = asyncio.get_running_loop()
    until = loop.time() + aim
    while True:
        ready, mid = await _snapshot(cluster)
        if mid or ready == total or loop.time() > until:
            return ready, mid
        await asyncio.sleep(0.02)


async def _all_ready(cluster: Cluster, names: list[str], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while True:
        statuses = await _statuses(cluster)
        waiting = [n for n in names if statuses.get(n, {}).get("phase") != "Ready"]
        if not waiting:
            return
        if loop.time() > until:
            shown = {
                n: (statuses.get(n, {}).get("phase"), statuses.get(n, {}).get("message")) for n in waiting[:5]
            }
            raise AssertionError(f"{len(waiting)} Devices not Ready after {deadline:g}s, e.g. {shown}")
        await asyncio.sleep(0.3)


async def crash_loop(cluster: Cluster, fleet: Fleet, operator: OperatorProcess, plan: Plan) -> CrashRun:
    """Create an Endpoint, a Group and ``plan.devices`` Devices, kill and restart the (already
    started) operator ``plan.kills`` times, then wait until every Device is Ready."""
    await fleet.endpoint("aws", rate=plan.rate)
    await fleet.group("g", "aws")
    cluster.kmock.keep_requests = 32  # kmock matches each request against its history: keep it short
    run = CrashRun(plan, [f"c{i:03d}" for i in range(plan.devices)])
    for name in run.names:
        await fleet.device(name, "g")
    rng = random.Random(plan.seed)
    for _ in range(plan.kills):
        delay = rng.uniform(*plan.delay)
        await asyncio.sleep(delay)
        ready, mid = await _caught_mid_way(cluster, len(run.names))
        operator.kill()
        run.kills.append(KillPoint(delay, ready, mid))
        operator.start()
    started = time.monotonic()
    await _all_ready(cluster, run.names, plan.settle_deadline)
    run.settle_s = time.monotonic() - started
    return run


def _pages(iot: Any, operation: str, key: str, **kw: Any) -> list[Any]:
    found: list[Any] = []
    for page in iot.get_paginator(operation).paginate(**kw):
        found.extend(page[key])
    return found


async def audit(cluster: Cluster, iot: Any, vault: Vault, names: list[str]) -> list[str]:
    """Every way the cloud, Vault and the Devices disagree; empty when they are consistent."""
    problems: list[str] = []
    listed = await _statuses(cluster)
    statuses = {name: listed.get(name, {}) for name in names}
    for name, status in statuses.items():
        if status.get("phase") != "Ready":
            problems.append(f"device {name} is {status.get('phase')}: {status.get('message')}")

    def owners(field_name: str) -> Counter[str]:
        return Counter(str(s.get(field_name)) for s in statuses.values())

    def compare(kind: str, in_cloud: list[str], field_name: str) -> None:
        claimed = owners(field_name)
        for item, count in Counter(in_cloud).items():
            if item not in claimed:
                problems.append(f"orphan {kind} {item}: no Device claims it")
            elif count > 1:
                problems.append(f"{kind} {item} listed {count} times")
        for item, count in claimed.items():
            if count > 1:
                problems.append(f"{kind} {item} claimed by {count} Devices")
            if item not in in_cloud:
                problems.append(f"{kind} {item} named in a status is missing from the cloud")

    things = [t["thingName"] for t in _pages(iot, "list_things", "things")]
    certs = _pages(iot, "list_certificates", "certificates")
    policies = [p["policyName"] for p in _pages(iot, "list_policies", "policies")]
    compare("thing", things, "cloudId")
    compare("certificate", [c["certificateId"] for c in certs], "certificateId")
    compare("policy", policies, "policyName")
    problems += [
        f"certificate {c['certificateId']} is {c['status']}" for c in certs if c["status"] != "ACTIVE"
    ]

    # Each identity is wired as the status says: thing -> its one certificate -> its one policy.
    for name, status in statuses.items():
        if status.get("phase") != "Ready":
            continue
        principals = iot.list_thing_principals(thingName=status["cloudId"])["principals"]
        if principals != [status["certificateArn"]]:
            problems.append(f"device {name}: thing principals {principals} != its certificate")
        attached = [
            p["policyName"] for p in iot.list_attached_policies(target=status["certificateArn"])["policies"]
        ]
        if attached != [status["policyName"]]:
            problems.append(f"device {name}: certificate policies {attached} != [{status['policyName']}]")

    # Vault: one record per Device, holding the certificate the cloud has for it.
    stored = vault.secret_paths(cluster.namespace)
    if stored != sorted(names):
        problems.append(f"Vault records {sorted(set(stored) ^ set(names))} do not match the Devices")
    reader = VaultKeyStore(VaultConfig(address=vault.url, token=vault.operator_token))
    try:
        for name, status in statuses.items():
            info = await reader.describe(ObjectRef(cluster.namespace, name))
            if info is None:
                problems.append(f"device {name}: no Vault record")
                continue
            facts = (info.metadata.get("certificateId"), info.metadata.get("thumbprint"))
            if facts != (status.get("certificateId"), status.get("thumbprint")):
                problems.append(f"device {name}: Vault holds certificate {facts[0]}, status names another")
            if info.location != status.get("keyLocation"):
                problems.append(f"device {name}: keyLocation {status.get('keyLocation')} != {info.location}")
    finally:
        reader.close()
    return problems


def report(run: CrashRun, problems: list[str]) -> str:
    """A human summary: the seed, where each kill landed, and the audit's verdict."""
    plan = run.plan
    lines = [
        f"crash consistency: {plan.devices} devices at {plan.rate:g}/s, {plan.kills} SIGKILLs, "
        f"seed {plan.seed}",
        f"kills while provisioning: {run.kills_while_provisioning}/{len(run.kills)}; with a device "
        f"caught mid-way (Provisioning + progress): {sum(1 for k in run.kills if k.mid_provisioning)}",
    ]
    for i, k in enumerate(run.kills, 1):
        lines.append(f"  kill {i:2d} after {k.after:4.2f}s: {k.ready} ready, {k.mid_provisioning} mid-way")
    lines.append(f"all Ready {run.settle_s:.1f}s after the last restart")
    if problems:
        lines.append(f"INCONSISTENT ({len(problems)} problems):")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append(
            f"consistent: {plan.devices} Devices Ready; things, certificates, policies and Vault records "
            "each belong to exactly one Device"
        )
    return "\n".join(lines)
