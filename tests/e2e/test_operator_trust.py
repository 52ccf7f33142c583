"""Issue 13 on a real API server: the operator installed by the chart (its own ServiceAccount and
RBAC), on moto and OpenBao, as a platform engineer would try it.

* Groups and Endpoints that Devices use wait to be deleted, and say why, until the Devices are
  gone; nothing is left at the cloud or in Vault, even when the Endpoint's Secret went first.
* Fields that say where an identity lives cannot be edited in place.
* Failures that fix themselves are waiting states; the Endpoint drops Ready as soon as a device
  finds its keys unusable; a Secret the operator may not read says which Helm value to set.
* An operator that cannot work says so in one line and exits; with no settings it runs.
* Logs are JSON lines naming the object; events and the Step column follow each cloud step.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import hvac
import pytest
from botocore.config import Config

from tests.e2e.harness import Install, Process, install, wait_until
from tests.support.kube import ApiError, Kube
from tests.support.procs import Bao, Moto

REGION = "eu-west-1"
KEYS = {"AWS_ACCESS_KEY_ID": "AKIDTRUSTTEST", "AWS_SECRET_ACCESS_KEY": "trust-not-a-real-secret"}
API = "cloudconnector.io/v1alpha1"


@pytest.fixture(scope="module")
def namespaces(kube: Kube) -> tuple[str, str]:
    """The fleet's namespace, and one the operator watches but may read no Secrets in."""
    return kube.namespace("trust"), kube.namespace("trust-noread")


@pytest.fixture(scope="module")
def chart(
    kube: Kube, bao: Bao, namespaces: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Install]:
    fleet_ns, other_ns = namespaces
    values = {
        "operator": {
            "watchNamespaces": [fleet_ns, other_ns],
            "secretAccess": {"namespaces": [fleet_ns]},
        }
    }
    with install(kube, bao, tmp_path_factory.mktemp("trust"), values) as inst:
        yield inst


@pytest.fixture(scope="module")
def operator(chart: Install) -> Iterator[Process]:
    # A slow credential recheck, so that an Endpoint dropping Ready shows the device's finding.
    proc = chart.operator(CLOUDCONNECTOR_ENDPOINT_RECHECK="300")
    try:
        yield proc
    finally:
        proc.stop()
        log = proc.output()
        print("\n".join(log.splitlines()[-80:]))  # shown by pytest when a test failed
        assert "PRIVATE KEY-----" not in log
        assert KEYS["AWS_SECRET_ACCESS_KEY"] not in log


def iot(moto: Moto) -> Any:
    return boto3.client(
        "iot",
        region_name=REGION,
        endpoint_url=moto.url,
        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"total_max_attempts": 1}),
    )


def thing_names(moto: Moto, prefix: str) -> set[str]:
    return {t["thingName"] for t in iot(moto).list_things()["things"] if t["thingName"].startswith(prefix)}


def vault_keys(bao: Bao, namespace: str) -> list[str]:
    root = hvac.Client(url=bao.url, token=bao.token)
    try:
        listed = root.secrets.kv.v2.list_secrets(path=f"cloud-connector/{namespace}", mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return []
    return sorted(listed["data"]["keys"])


class Fleet:
    """Objects in one namespace, applied as a user would, and what the API shows about them."""

    def __init__(self, kube: Kube, ns: str, moto: Moto) -> None:
        self.kube, self.ns, self.moto = kube, ns, moto
        self._n = 0

    def secret(self, name: str) -> None:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in KEYS.items()}
        self.kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": self._meta(name), "data": data})

    def _meta(self, name: str) -> dict[str, str]:
        return {"name": name, "namespace": self.ns}

    def endpoint(self, name: str, *, make_secret: bool = True, **aws: Any) -> None:
        if make_secret:
            self.secret(f"{name}-keys")
        spec = {
            "region": REGION,
            "endpointUrl": self.moto.url,
            "credentialsSecretRef": {"name": f"{name}-keys"},
        }
        self.kube.apply(
            {
                "apiVersion": API,
                "kind": "Endpoint",
                "metadata": self._meta(name),
                "spec": {"type": "AwsIotCore", "rateLimit": {"devicesPerSecond": 50}, "aws": {**spec, **aws}},
            }
        )

    def group(self, name: str, endpoint: str) -> None:
        self.kube.apply(
            {
                "apiVersion": API,
                "kind": "Group",
                "metadata": self._meta(name),
                "spec": {"endpointRef": {"name": endpoint}},
            }
        )

    def device(self, name: str, group: str, **spec: Any) -> dict[str, Any]:
        self._n += 1
        n = self._n
        body = {
            "group": group,
            "sim": {"iccid": f"89353019999{n:08d}"},
            "ip": f"10.77.{n // 250}.{n % 250 + 1}",
        }
        obj = {"apiVersion": API, "kind": "Device", "metadata": self._meta(name), "spec": {**body, **spec}}
        self.kube.apply(obj)
        return obj

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.kube.get(kind, self.ns, name)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return dict((self.get(kind, name) or {}).get("status") or {})

    def condition(self, kind: str, name: str, ctype: str) -> dict[str, Any]:
        for c in self.status(kind, name).get("conditions") or ():
            if c.get("type") == ctype:
                return dict(c)
        return {}

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            f"Device {name} {phase}",
            lambda: (s := self.status("Device", name)).get("phase") == phase and s,
            timeout,
        )

    def delete(self, kind: str, *names: str) -> None:
        short = {"Device": "ccd", "Group": "ccg", "Endpoint": "cce", "Secret": "secret"}[kind]
        self.kube.kubectl("delete", short, *names, "-n", self.ns, "--wait=false")

    def events(self, name: str) -> list[dict[str, Any]]:
        done = self.kube.kubectl(
            "get", "events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}", "-o", "json"
        )
        return list(json.loads(done.stdout)["items"])

    def reasons(self, name: str) -> list[str]:
        return [str(e.get("reason")) for e in self.events(name)]


@pytest.fixture
def fleet(kube: Kube, namespaces: tuple[str, str], moto_server: Moto, operator: Process) -> Fleet:
    return Fleet(kube, namespaces[0], moto_server)


# --- 1. in-use protection ------------------------------------------------------------------------


def test_a_group_in_use_waits_for_its_devices(fleet: Fleet, bao: Bao) -> None:
    fleet.endpoint("aws-g")
    fleet.group("meters", "aws-g")
    fleet.device("g1", "meters")
    fleet.device("g2", "meters")
    fleet.wait_phase("g1", "Ready")
    fleet.wait_phase("g2", "Ready")

    fleet.delete("Group", "meters")
    terminating = wait_until(
        "the Group's Terminating condition",
        lambda: (c := fleet.condition("Group", "meters", "Terminating")).get("status") == "True" and c,
    )
    assert terminating["reason"] == "InUse"
    assert "2 Devices in this Group (g1, g2)" in terminating["message"]
    assert "move them to another Group or delete them" in terminating["message"]
    group = fleet.get("Group", "meters")
    assert group is not None and group["metadata"].get("deletionTimestamp")
    assert "cloudconnector.io/cloud-identity" in group["metadata"]["finalizers"]
    wait_until("the DeletionWaits event", lambda: fleet.reasons("meters").count("DeletionWaits") == 1)
    # The devices are still what they were: their Group and its Endpoint are there.
    assert fleet.status("Device", "g1")["phase"] == "Ready"

    # A Device that joins the Group being deleted gets no identity in it.
    fleet.device("g3", "meters")
    waiting = fleet.wait_phase("g3", "Pending")
    assert "Group 'meters' is being deleted" in waiting["message"]

    fleet.delete("Device", "g1", "g2", "g3")
    wait_until("the Group to go", lambda: fleet.get("Group", "meters") is None, timeout=90)
    assert thing_names(fleet.moto, f"{fleet.ns}_g") == set()
    assert not {"g1", "g2", "g3"} & set(vault_keys(bao, fleet.ns))
    assert fleet.reasons("meters").count("DeletionWaits") == 1  # one event, not one per retry


def test_an_endpoint_in_use_keeps_its_credentials_until_the_last_identity_is_gone(
    fleet: Fleet, bao: Bao
) -> None:
    fleet.endpoint("aws-e")
    fleet.group("sensors", "aws-e")
    fleet.device("e1", "sensors")
    fleet.wait_phase("e1", "Ready")
    assert thing_names(fleet.moto, f"{fleet.ns}_e1") == {f"{fleet.ns}_e1"}

    # `kubectl delete -f` of a file holding the Secret and the Endpoint removes both at once.
    fleet.delete("Secret", "aws-e-keys")
    fleet.delete("Endpoint", "aws-e")
    terminating = wait_until(
        "the Endpoint's Terminating condition",
        lambda: (c := fleet.condition("Endpoint", "aws-e", "Terminating")).get("status") == "True" and c,
    )
    assert "1 Device" in terminating["message"] and "(e1)" in terminating["message"]
    assert "credentials stay in use" in terminating["message"]
    assert fleet.status("Device", "e1")["phase"] == "Ready"
    wait_until("the DeletionWaits event", lambda: "DeletionWaits" in fleet.reasons("aws-e"))

    # The Device deleted now is deprovisioned with the keys the operator read last.
    fleet.delete("Device", "e1")
    wait_until("e1 to go", lambda: fleet.get("Device", "e1") is None, timeout=90)
    assert thing_names(fleet.moto, f"{fleet.ns}_e1") == set()
    assert "e1" not in vault_keys(bao, fleet.ns)
    wait_until("the Endpoint to go", lambda: fleet.get("Endpoint", "aws-e") is None, timeout=30)


# --- 2. fields that say where an identity lives -----------------------------------------------


def _refused(kube: Kube, ns: str, kind: str, name: str, patch: dict[str, Any]) -> str:
    with pytest.raises(ApiError) as refused:
        kube.merge_patch(kind, ns, name, patch)
    assert refused.value.status == 422
    return refused.value.message


def test_cloud_id_and_thing_prefix_cannot_drift(kube: Kube) -> None:
    ns = kube.namespace("trust-cel")
    kube.apply(
        {
            "apiVersion": API,
            "kind": "Endpoint",
            "metadata": {"name": "aws", "namespace": ns},
            "spec": {"type": "AwsIotCore", "aws": {"region": REGION, "thingPrefix": "site1-"}},
        },
        *[
            {
                "apiVersion": API,
                "kind": "Device",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"group": "g", "sim": {"iccid": f"8935301888800000{i:03d}"}, **extra},
            }
            for i, (name, extra) in enumerate([("named", {"cloudId": "meter-a"}), ("derived", {})])
        ],
    )
    message = "spec.cloudId cannot be added, changed or removed"
    assert message in _refused(kube, ns, "Device", "named", {"spec": {"cloudId": "meter-b"}})
    assert message in _refused(kube, ns, "Device", "named", {"spec": {"cloudId": None}})
    assert message in _refused(kube, ns, "Device", "derived", {"spec": {"cloudId": "meter-c"}})
    prefix = "spec.aws.thingPrefix cannot be added, changed or removed"
    assert prefix in _refused(kube, ns, "Endpoint", "aws", {"spec": {"aws": {"thingPrefix": "site2-"}}})
    assert prefix in _refused(kube, ns, "Endpoint", "aws", {"spec": {"aws": {"thingPrefix": None}}})
    # Everything else stays editable.
    kube.merge_patch("Device", ns, "named", {"spec": {"ip": "10.9.9.9"}})
    kube.merge_patch("Endpoint", ns, "aws", {"spec": {"rateLimit": {"devicesPerSecond": 5}}})


# --- 3. failure states that tell the truth ----------------------------------------------------


def test_a_vanished_secret_is_a_waiting_state_and_the_endpoint_drops_ready_at_once(fleet: Fleet) -> None:
    fleet.endpoint("aws-c")
    fleet.group("trackers", "aws-c")
    fleet.device("c1", "trackers")
    fleet.wait_phase("c1", "Ready")
    wait_until("Endpoint Ready", lambda: fleet.status("Endpoint", "aws-c").get("phase") == "Ready")

    fleet.delete("Secret", "aws-c-keys")
    fleet.device("c2", "trackers")
    waiting = fleet.wait_phase("c2", "Pending")
    ready = fleet.condition("Device", "c2", "Ready")
    # Its own cloud call found the keys missing, or (once the Endpoint said so) the Endpoint's cause.
    assert ready["reason"] in ("SecretNotFound", "EndpointNotReady") and "aws-c-keys" in ready["message"]
    # The Endpoint says so now, not at its next check (300 s away in this operator).
    endpoint = wait_until(
        "the Endpoint to drop Ready",
        lambda: (c := fleet.condition("Endpoint", "aws-c", "Ready")).get("status") == "False" and c,
        timeout=15,
    )
    assert endpoint["reason"] == "SecretNotFound"
    assert fleet.status("Device", "c1")["phase"] == "Ready"  # its identity keeps working
    assert "Failed" not in str(waiting.get("phase"))

    fleet.secret("aws-c-keys")  # restored: both recover by themselves
    wait_until("Endpoint Ready again", lambda: fleet.status("Endpoint", "aws-c").get("phase") == "Ready")
    fleet.wait_phase("c2", "Ready")
    # One warning event per new problem on the device, not one per retry.
    assert fleet.reasons("c2").count("SecretNotFound") == 1

    fleet.delete("Device", "c1", "c2")
    wait_until("c1, c2 gone", lambda: not fleet.get("Device", "c1") and not fleet.get("Device", "c2"), 90)


def test_a_secret_the_operator_may_not_read_names_the_helm_value(
    kube: Kube, namespaces: tuple[str, str], moto_server: Moto, operator: Process
) -> None:
    other = Fleet(kube, namespaces[1], moto_server)
    other.endpoint("aws-x")
    ready = wait_until(
        "the Endpoint's Ready condition",
        lambda: (c := other.condition("Endpoint", "aws-x", "Ready")).get("status") == "False" and c,
    )
    assert ready["reason"] == "SecretForbidden"
    assert f"may not read Secret {namespaces[1]}/aws-x-keys" in ready["message"]
    assert "operator.secretAccess.namespaces" in ready["message"]


# --- 4. works out of the box, or says in one line why not ---------------------------------------


def _run_to_exit(env: dict[str, str], timeout: float = 30) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "cloudconnector.operator.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_an_operator_without_rights_says_so_in_one_line(kube: Kube, chart: Install, tmp_path: Path) -> None:
    ns = kube.namespace("trust-norbac")
    kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody", "namespace": ns}}
    )
    kubeconfig = kube.kubeconfig_for_token(kube.service_account_token(ns, "nobody"), tmp_path / "kc")
    env = {**chart.env("operator"), "KUBECONFIG": str(kubeconfig)}
    started = time.monotonic()
    code, lines = _run_to_exit(env)
    assert code == 2 and time.monotonic() - started < 20
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "critical"
    assert "not allowed to list endpoints.cloudconnector.io" in line["message"]
    assert "RBAC" in line["message"]


def test_an_operator_that_may_list_but_not_watch_says_so(kube: Kube, chart: Install, tmp_path: Path) -> None:
    ns = kube.namespace("trust-nowatch")
    rules = [
        {
            "apiGroups": ["cloudconnector.io"],
            "resources": ["endpoints", "groups", "devices"],
            "verbs": ["get", "list"],
        }
    ]
    kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "reader", "namespace": ns},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    kubeconfig = kube.kubeconfig_for_token(kube.service_account_token(ns, "reader"), tmp_path / "kc")
    env = {**chart.env("operator"), "KUBECONFIG": str(kubeconfig), "CLOUDCONNECTOR_NAMESPACES": ns}
    code, lines = _run_to_exit(env)
    assert code == 2 and len(lines) == 1, lines
    message = json.loads(lines[0])["message"]
    assert f"not allowed to watch endpoints.cloudconnector.io in namespace {ns}" in message


def test_with_no_settings_the_operator_runs(
    kube: Kube, chart: Install, moto_server: Moto, tmp_path: Path
) -> None:
    """README: kubectl apply -f crds/, then cloud-connector-operator. No peering unless asked."""
    ns = kube.namespace("trust-plain")
    env = chart.env("operator")
    for key in [k for k in env if k.startswith("CLOUDCONNECTOR_") and "VAULT" not in k]:
        del env[key]
    env.update(KUBECONFIG=str(kube.kubeconfig), CLOUDCONNECTOR_NAMESPACES=ns)
    proc = Process([sys.executable, "-m", "cloudconnector.operator.main"], env, tmp_path / "op.log")
    proc.start()
    plain = Fleet(kube, ns, moto_server)
    try:
        plain.endpoint("aws")
        wait_until("Endpoint Ready", lambda: plain.status("Endpoint", "aws").get("phase") == "Ready", 60)
        assert proc.alive(), proc.output()[-2000:]
        assert "critical" not in proc.output()
        plain.delete("Endpoint", "aws")  # unused: its finalizer goes at once
        wait_until("the Endpoint to go", lambda: plain.get("Endpoint", "aws") is None, 30)
    finally:
        proc.stop()


# --- 5. logs ------------------------------------------------------------------------------------


def _log(operator: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in operator.output().splitlines() if line.strip()]


def test_log_lines_are_json_naming_their_object(operator: Process, fleet: Fleet) -> None:
    fleet.endpoint("aws-l", make_secret=False)  # its keys come late: a failure, checked every 2 s
    fleet.group("loggers", "aws-l")
    fleet.device("l1", "loggers")
    wait_until("Endpoint Error", lambda: fleet.status("Endpoint", "aws-l").get("phase") == "Error")
    time.sleep(4.5)  # two more checks of its keys (every 2 s here)
    failure = [
        line
        for line in _log(operator)
        if line.get("name") == "aws-l" and line["level"] == "warning" and "aws-l-keys" in line["message"]
    ]
    assert len(failure) == 1, failure  # logged when it appeared, not at every check
    assert failure[0]["kind"] == "Endpoint" and failure[0]["namespace"] == fleet.ns
    fleet.secret("aws-l-keys")
    fleet.wait_phase("l1", "Ready")

    # Quiet times are quiet: status timers run every second here, and say nothing at INFO.
    time.sleep(1)
    before = len(_log(operator))
    time.sleep(3)
    chatter = [line for line in _log(operator)[before:] if line["level"] != "debug"]
    assert chatter == [], chatter

    lines = _log(operator)
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
        if "name" in line:
            assert line.get("kind") in ("Endpoint", "Group", "Device") and line.get("namespace")
    about_l1 = [line for line in lines if line.get("name") == "l1"]
    assert any("Provisioned" in line["message"] for line in about_l1)
    info = [line["message"] for line in lines if line["level"] == "info"]
    assert not [m for m in info if m.startswith("Timer ")], "timer successes belong at DEBUG"
    # A retry for the same reason is logged once, however often it is retried.
    retries = [line for line in lines if "failed temporarily" in line["message"]]
    seen = [(line.get("name"), line["message"]) for line in retries]
    assert len(seen) == len(set(seen)), retries
    fleet.delete("Device", "l1")
    wait_until("l1 gone", lambda: fleet.get("Device", "l1") is None, 90)


# --- 6. events per step, and a watch that shows steps ------------------------------------------


def test_each_cloud_step_is_an_event_and_a_watch_row(fleet: Fleet, kube: Kube) -> None:
    fleet.endpoint("aws-w")
    fleet.group("watched", "aws-w")
    wait_until("Endpoint Ready", lambda: fleet.status("Endpoint", "aws-w").get("phase") == "Ready")
    env = {"KUBECONFIG": str(kube.kubeconfig), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    watch = subprocess.Popen(
        [
            "kubectl",
            "get",
            "ccd",
            "-n",
            fleet.ns,
            "-w",
            "--no-headers",
            "--field-selector",
            "metadata.name=w1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(1)
        fleet.device("w1", "watched")
        fleet.wait_phase("w1", "Ready")
        time.sleep(2)
    finally:
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    rows = [" ".join(line.split()[:-1]) for line in out.splitlines() if line.strip()]  # without Age
    steps = ["ThingCreated", "PolicyCreated", "CertificateCreated", "CertificateActivated", "KeyStored"]
    reasons = fleet.reasons("w1")
    assert sorted(r for r in reasons if r in steps) == sorted(steps), reasons  # each step once
    assert "Provisioned" in reasons
    # Each row that a checkpoint adds names its step (a step finished in the same write as the
    # next one shows as that one), in the order they happen.
    shown = [row.split()[-1] for row in rows if row.split()[-1] in steps]
    assert shown == [step for step in steps if step in shown], rows
    assert {"ThingCreated", "PolicyCreated", "CertificateCreated", "KeyStored"} <= set(shown), rows
    assert rows[-1].split()[1] == "Ready", rows
    repeats = sum(1 for a, b in itertools.pairwise(rows) if a == b)
    # Left: kopf adding its finalizer and its last-handled annotation, and the name reserved
    # before the first cloud call; every other row shows something new.
    assert repeats <= 3, "\n".join(rows)
    fleet.delete("Device", "w1")
    wait_until("w1 gone", lambda: fleet.get("Device", "w1") is None, 90)


# --- 7. the CRD's explain hint works ------------------------------------------------------------


def test_kubectl_explain_cce_spec_teaches(kube: Kube) -> None:
    header = (Path(__file__).resolve().parents[2] / "crds" / "endpoints.yaml").read_text().splitlines()[:4]
    assert any("kubectl explain cce.spec" in line for line in header)
    assert not any("endpoints.cloudconnector.io.spec" in line for line in header)
    out = kube.kubectl("explain", "cce.spec").stdout
    text = " ".join(out.split())
    assert "GROUP: cloudconnector.io KIND: Endpoint" in text  # ours, not the core Endpoints
    assert "Which cloud service this is and how to reach and manage it" in text
    prefix = kube.kubectl("explain", "cce.spec.aws.thingPrefix").stdout
    assert "cannot be added, changed or removed" in " ".join(prefix.split())
