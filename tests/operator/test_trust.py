"""Issue 13 at kmock speed: in-use protection through the operator process, the one-line refusal to
start without CRDs, the defaults that need nothing extra, and the pieces behind logs and events.
The same points are proved on a real API server in tests/e2e/test_operator_trust.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
from typing import Any

import kmock as kmocklib
import pytest

from cloudconnector.core.in_use import endpoint_holders, group_holders, waiting_message
from cloudconnector.core.provisioners import ProvisionerPool
from cloudconnector.core.steps import completed, new_steps
from cloudconnector.errors import CredentialsError
from cloudconnector.model import parse_endpoint
from cloudconnector.operator.config import OperatorConfig
from cloudconnector.operator.logs import JsonFormatter, Quieter, about
from tests.operator.apiserver import ApiServer
from tests.operator.conftest import DEVICES, ENDPOINTS, GROUPS, Cluster, Fleet, OperatorProcess, Vault

# --- in-use protection, through the operator --------------------------------------------------


def _condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == ctype:
            return dict(c)
    return {}


async def test_an_endpoint_and_a_group_wait_while_devices_use_them(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess, aws: Any, vault: Vault
) -> None:
    await fleet.endpoint("aws")
    await fleet.group("g", "aws")
    await fleet.device("d", "g")
    await cluster.wait_phase(DEVICES, "d", "Ready")

    await cluster.delete(ENDPOINTS, "aws")
    await cluster.delete(GROUPS, "g")
    for res, name in ((ENDPOINTS, "aws"), (GROUPS, "g")):
        held = await cluster.wait_for(
            res, name, lambda o: _condition(o, "Terminating").get("status") == "True", "Terminating"
        )
        assert held is not None and "(d)" in _condition(held, "Terminating")["message"]
    await cluster.wait_events("aws", {"DeletionWaits"})
    assert (await cluster.get(DEVICES, "d") or {})["status"]["phase"] == "Ready"

    await cluster.delete(DEVICES, "d")
    await cluster.wait_gone(DEVICES, "d")
    await cluster.wait_gone(GROUPS, "g")
    await cluster.wait_gone(ENDPOINTS, "aws")
    assert aws().list_things()["things"] == []
    assert vault.secret_paths(cluster.namespace) == []


async def test_an_unused_endpoint_goes_at_once(
    cluster: Cluster, fleet: Fleet, operator: OperatorProcess
) -> None:
    await fleet.endpoint("idle")
    await cluster.wait_phase(ENDPOINTS, "idle", "Ready")
    await cluster.delete(ENDPOINTS, "idle")
    await cluster.wait_gone(ENDPOINTS, "idle")
    assert "DeletionWaits" not in {e.get("reason") for e in cluster.events("idle")}


def test_holders() -> None:
    def device(name: str, group: str, endpoint: str | None = None, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "spec": {"group": group},
            "status": {"endpoint": endpoint} if endpoint else {},
        }

    groups = [{"metadata": {"name": "g"}, "spec": {"endpointRef": {"name": "e"}}}]
    devices = [
        device("a", "g", "e"),  # identity there
        device("b", "g"),  # on its way there
        device("c", "other", "e"),  # moving away: its identity is still there
        device("d", "g", "elsewhere", deleting=True),  # leaving, and not through e
        device("f", "other"),
    ]
    assert endpoint_holders("e", groups, devices) == ["a", "b", "c"]
    assert group_holders("g", devices) == ["a", "b", "d"]
    many = waiting_message("Group", [f"d{i}" for i in range(8)])
    assert "8 Devices" in many and "d4 and 3 more" in many


# --- works out of the box, or says why not in one line -------------------------------------------


def test_defaults_need_nothing_extra() -> None:
    plain = OperatorConfig.from_env({})
    assert plain.peering is None and plain.namespace_scanning
    named = OperatorConfig.from_env({"CLOUDCONNECTOR_NAMESPACES": "fleet, other"})
    assert named.namespaces == ("fleet", "other") and not named.namespace_scanning
    assert OperatorConfig.from_env({"CLOUDCONNECTOR_NAMESPACES": "team-*"}).namespace_scanning
    assert OperatorConfig.from_env({"CLOUDCONNECTOR_PEERING": "cc"}).peering == "cc"


async def test_missing_crds_stop_the_operator_with_one_line(operator_env: dict[str, str]) -> None:
    async with ApiServer() as bare, kmocklib.Server(bare):  # no CRDs registered
        env = {**operator_env, "CLOUDCONNECTOR_K8S_SERVER": str(bare.url).rstrip("/")}
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cloudconnector.operator.main"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "critical"
    assert "CRD endpoints.cloudconnector.io is not installed: kubectl apply -f crds/" in line["message"]


# --- logs ------------------------------------------------------------------------------------------


def _capture() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(f"test.trust.{id(out)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    return log, out


def test_json_lines_name_the_object_the_handler_works_on() -> None:
    log, out = _capture()
    with about("Device", "fleet", "meter-1"):
        log.warning("credentials rejected")
    log.info("not about an object")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "warning" and first["message"] == "credentials rejected"
    assert (first["kind"], first["namespace"], first["name"]) == ("Device", "fleet", "meter-1")
    assert "name" not in second


def test_repeated_retries_and_timer_successes_go_down_to_debug() -> None:
    log, out = _capture()
    quiet = Quieter()
    log.addFilter(quiet)
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        with about("Endpoint", "fleet", "aws"):
            for _ in range(3):
                log.error("Handler 'endpoint_deleted' failed temporarily: deletion waits for 1 Device")
            log.error("Handler 'endpoint_deleted' failed temporarily: deletion waits for 2 Devices")
            log.info("Timer 'endpoint_usage' succeeded.")
            log.info("Handler 'endpoint_deleted' succeeded.")
            log.error("Handler 'endpoint_deleted' failed temporarily: deletion waits for 2 Devices")
    finally:
        logging.getLogger().setLevel(root_level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    retry = "Handler 'endpoint_deleted' failed temporarily: deletion waits for"
    assert [(line["level"], line["message"]) for line in lines] == [
        ("warning", f"{retry} 1 Device"),
        ("warning", f"{retry} 2 Devices"),
        ("info", "Handler 'endpoint_deleted' succeeded."),
        ("warning", f"{retry} 2 Devices"),  # after a success the same reason is news again
    ]


# --- events per step -------------------------------------------------------------------------------


def test_steps_read_off_the_progress_record() -> None:
    reserved = {"thingName": "t", "thingOwned": True}
    made = {**reserved, "thingArn": "arn:t"}
    policy = {**made, "policyName": "t-policy", "policyReady": True}
    stored = {**policy, "certificate": {"id": "c" * 64, "registered": True, "active": True, "stored": True}}
    assert new_steps({}, reserved) == []
    assert [s for s, _ in new_steps(reserved, made)] == ["ThingCreated"]
    assert [s for s, _ in new_steps(policy, stored)] == [
        "CertificateCreated",
        "CertificateActivated",
        "KeyStored",
    ]
    assert new_steps(stored, stored) == []  # a resumed run repeats nothing
    azure = {"deviceId": "d", "step": "done", "keyLocation": "vault:x"}
    assert [s for s, _ in completed(azure)] == ["KeyStored", "DeviceRegistered"]


async def test_peering_asked_for_without_its_crds_stops_with_one_line(
    cluster: Cluster, operator_env: dict[str, str]
) -> None:
    env = {**operator_env, "CLOUDCONNECTOR_PEERING": "cloud-connector"}  # kmock serves no kopf.dev
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cloudconnector.operator.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, lines
    message = json.loads(lines[0])["message"]
    assert "peering is on" in message and "kopfpeerings.kopf.dev is not installed" in message
    assert "CLOUDCONNECTOR_PEERING=off" in message


# --- removal keeps the keys read last ---------------------------------------------------------------


async def test_removal_goes_on_with_the_keys_read_last() -> None:
    secret: dict[str, str] | None = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}
    made: list[dict[str, str]] = []

    async def load(_endpoint: Any) -> dict[str, str]:
        if secret is None:
            raise CredentialsError("credentials Secret 'keys' does not exist", reason="SecretNotFound")
        return dict(secret)

    class Stub:
        async def aclose(self) -> None:
            pass

    def factory(_endpoint: Any, credentials: Any, _limiter: Any) -> Any:
        made.append(dict(credentials))
        return Stub()

    pool = ProvisionerPool(factory, load)
    endpoint = parse_endpoint(
        {
            "apiVersion": "cloudconnector.io/v1alpha1",
            "kind": "Endpoint",
            "metadata": {"name": "aws", "namespace": "fleet", "uid": "u1", "generation": 1},
            "spec": {
                "type": "AwsIotCore",
                "aws": {"region": "eu-west-1", "credentialsSecretRef": {"name": "k"}},
            },
        }
    )
    first = await pool.get(endpoint)
    secret = None  # deleted together with the Endpoint
    assert await pool.get(endpoint, removal=True) is first
    with pytest.raises(CredentialsError):
        await pool.get(endpoint)  # new work waits for the Secret
    assert len(made) == 1
