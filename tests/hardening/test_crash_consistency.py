"""Crash consistency, CI size: the operator SIGKILLed at random moments while it provisions, then
an audit of moto and Vault against the Devices (the full-size run is ``python bench/crash.py``).

The size and seed can be changed through the environment (bench/crash.py does):
``CLOUDCONNECTOR_CRASH_DEVICES``, ``_KILLS``, ``_RATE``, ``_SEED``, ``_SETTLE``. A failure prints the seed.
"""

# ruff: noqa: F811  (fixtures imported from tests/operator/conftest.py are parameters here)

from __future__ import annotations

import os
from typing import Any

from tests.hardening.crashloop import Plan, audit, crash_loop, report
from tests.operator.conftest import (  # noqa: F401  (fixtures reused)
    Cluster,
    Fleet,
    OperatorProcess,
    Vault,
    aws,
    cluster,
    fleet,
    operator,
    operator_env,  # operator's own fixtures must be visible here too
    vault,
)


def plan_from_env() -> Plan:
    env = os.environ.get
    # A fixed seed keeps CI repeatable; bench/crash.py draws a new one per run and prints it.
    seed = int(env("CLOUDCONNECTOR_CRASH_SEED") or 2026)
    return Plan(
        devices=int(env("CLOUDCONNECTOR_CRASH_DEVICES") or 20),
        kills=int(env("CLOUDCONNECTOR_CRASH_KILLS") or 6),
        seed=seed,
        rate=float(env("CLOUDCONNECTOR_CRASH_RATE") or 1.5),
        delay=(1.0, 3.0),
        settle_deadline=float(env("CLOUDCONNECTOR_CRASH_SETTLE") or 120),
    )


async def test_random_kills_leave_one_identity_per_device(
    cluster: Cluster,
    fleet: Fleet,
    operator: OperatorProcess,
    aws: Any,
    vault: Vault,
) -> None:
    plan = plan_from_env()
    try:
        run = await crash_loop(cluster, fleet, operator, plan)
    except AssertionError as e:
        raise AssertionError(f"seed {plan.seed}: {e}") from None
    problems = await audit(cluster, aws(), vault, run.names)
    summary = report(run, problems)
    print(summary)
    assert not problems, summary
    assert len(run.kills) == plan.kills
    # The rate limit keeps provisioning slower than the kills, so they land mid-way (a slower
    # machine only makes that more so); otherwise the run would prove nothing.
    assert sum(1 for k in run.kills if k.mid_provisioning) >= plan.kills // 2, summary


async def test_audit_finds_planted_orphans_and_duplicates(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    # The audit itself must be able to fail: plant what a botched resume would leave behind.
    run = await crash_loop(cluster, fleet, operator, Plan(devices=2, kills=0, seed=0, rate=50))
    assert await audit(cluster, aws(), vault, run.names) == []
    iot = aws()
    iot.create_thing(thingName=f"{cluster.namespace}_stray")
    extra = iot.create_keys_and_certificate(setAsActive=True)["certificateId"]
    iot.create_policy(policyName="stray-policy", policyDocument='{"Version": "2012-10-17", "Statement": []}')
    vault.root.secrets.kv.v2.create_or_update_secret(
        path=f"cloud-connector/{cluster.namespace}/stray", secret={"note": "no Device"}, mount_point="secret"
    )
    problems = await audit(cluster, iot, vault, run.names)
    text = "\n".join(problems)
    assert f"orphan thing {cluster.namespace}_stray" in text
    assert f"orphan certificate {extra}" in text
    assert "orphan policy stray-policy" in text
    assert "Vault records ['stray']" in text
