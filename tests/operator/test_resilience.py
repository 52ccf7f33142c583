"""The operator killed mid-provisioning, Vault down, rejected cloud credentials."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path
from typing import Any

import hvac

from cloudconnector.keystore.vault_setup import bootstrap
from tests.operator.conftest import DEVICES, ENDPOINTS, Cluster, Fleet, OperatorProcess, Vault
from tests.support.faults import THROTTLING, FaultProxy
from tests.support.procs import Bao, Moto


def mid_provisioning(obj: dict[str, Any] | None) -> bool:
    status = (obj or {}).get("status") or {}
    return status.get("phase") == "Provisioning" and bool(status.get("progress"))


async def test_killed_operator_finishes_without_duplicates_or_orphans(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    # Slow enough that the second kill, after a restart, still finds devices left to provision.
    await fleet.endpoint("aws", rate=1)
    await fleet.group("g", "aws")
    names = [f"d{i}" for i in range(6)]
    for name in names:
        await fleet.device(name, "g")

    loop = asyncio.get_running_loop()
    for kill in range(2):  # kill twice, at different points of the run
        victim = None
        until = loop.time() + 60
        while victim is None:
            for name in names:
                if mid_provisioning(await cluster.get(DEVICES, name)):
                    victim = name
                    break
            else:
                assert loop.time() < until, f"kill {kill + 1}: no device seen mid-way in 60 s"
                await asyncio.sleep(0.02)
        operator.kill()
        operator.start()

    for name in names:
        await cluster.wait_phase(DEVICES, name, "Ready")

    iot = aws()
    things = {t["thingName"] for t in iot.list_things()["things"]}
    assert things == {f"{cluster.namespace}_{n}" for n in names}
    certs = iot.list_certificates()["certificates"]
    assert len(certs) == len(names), "a second certificate was made for some device"
    assert all(c["status"] == "ACTIVE" for c in certs)
    assert len(iot.list_policies()["policies"]) == len(names)
    for name in names:
        status = (await cluster.get(DEVICES, name) or {})["status"]
        principals = iot.list_thing_principals(thingName=status["cloudId"])["principals"]
        assert principals == [status["certificateArn"]]
    assert vault.secret_paths(cluster.namespace) == sorted(names)


async def test_bad_credentials_show_on_the_endpoint(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any
) -> None:
    await fleet.endpoint("nokeys", secret="missing-secret", make_secret=False)
    await fleet.group("g", "nokeys")
    await fleet.device("waits", "g")

    endpoint = await cluster.wait_phase(ENDPOINTS, "nokeys", "Error")
    ready = next(c for c in endpoint["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "SecretNotFound"
    assert "missing-secret" in ready["message"]
    device = await cluster.wait_phase(DEVICES, "waits", "Pending")
    dready = next(c for c in device["status"]["conditions"] if c["type"] == "Ready")
    assert dready["reason"] == "EndpointNotReady"
    # The Device tells the Endpoint's cause too, once the Endpoint has found it.
    await cluster.wait_for(DEVICES, "waits", lambda o: "missing-secret" in (o or {})["status"]["message"])

    # Supplying the Secret heals both without touching the Device.
    await cluster.secret(
        "missing-secret", {"AWS_ACCESS_KEY_ID": "AKIDFIXED", "AWS_SECRET_ACCESS_KEY": "fixed"}
    )
    await cluster.wait_phase(ENDPOINTS, "nokeys", "Ready")
    await cluster.wait_phase(DEVICES, "waits", "Ready")
    assert operator.proc is not None and operator.proc.poll() is None


async def test_vault_down_devices_wait_and_retry(
    cluster: Cluster, fleet: Fleet, operator_env: dict[str, str], aws: Any, spare_bao: Bao
) -> None:
    # An operator of its own, pointed at a Vault this test may freeze.
    bootstrap(hvac.Client(url=spare_bao.url, token=spare_bao.token))
    env = {
        **operator_env,
        "VAULT_ADDR": spare_bao.url,
        "VAULT_TOKEN": spare_bao.token,
        "CLOUDCONNECTOR_VAULT_TIMEOUT": "1",
    }
    with tempfile.TemporaryDirectory() as tmp:
        op = OperatorProcess(env, Path(tmp) / "op.log")
        spare_bao.proc.send_signal(signal.SIGSTOP)  # Vault hangs, as when its node is partitioned
        op.start()
        try:
            await fleet.endpoint("aws")
            await fleet.group("g", "aws")
            await fleet.device("patient", "g")
            waiting = await cluster.wait_for(
                DEVICES,
                "patient",
                lambda o: any(
                    c["type"] == "Ready"
                    and c["status"] == "False"
                    and c["reason"] not in ("EndpointNotReady",)
                    for c in ((o or {}).get("status") or {}).get("conditions") or ()
                ),
                "a key store failure shown",
            )
            assert waiting is not None and waiting["status"]["phase"] in ("Provisioning", "Pending")
            reason = next(c["reason"] for c in waiting["status"]["conditions"] if c["type"] == "Ready")
            assert "Vault" in reason  # the key store failure, named
            spare_bao.proc.send_signal(signal.SIGCONT)
            ready = await cluster.wait_phase(DEVICES, "patient", "Ready")
            certs = aws().list_certificates()["certificates"]
            assert [c["certificateId"] for c in certs] == [ready["status"]["certificateId"]]
        finally:
            spare_bao.proc.send_signal(signal.SIGCONT)
            op.stop()


DEVICES_KEY = f"{DEVICES.group}/{DEVICES.version}/{DEVICES.plural}"


async def test_throttling_never_fails_a_device(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, moto_server: Moto
) -> None:
    async with FaultProxy(moto_server.url) as proxy:
        proxy.arm(THROTTLING, first=3, fraction=0.3)  # AWS answers ThrottlingException, often
        await fleet.endpoint("throttled", endpoint_url=proxy.url)
        await fleet.group("g", "throttled")
        names = [f"t{i}" for i in range(4)]
        for name in names:
            await fleet.device(name, "g")
        for name in names:
            await cluster.wait_phase(DEVICES, name, "Ready")
        assert proxy.faulted > 3
    # No version of any device's status ever said Failed.
    for name in names:
        history = cluster.kmock.objects[DEVICES_KEY, cluster.namespace, name].history
        phases = {((v or {}).get("status") or {}).get("phase") for v in history}
        assert "Failed" not in phases and "Ready" in phases
    certs = aws().list_certificates()["certificates"]
    assert len(certs) == len(names) and all(c["status"] == "ACTIVE" for c in certs)
