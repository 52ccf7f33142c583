"""No secret leaves through logs, errors, status, metrics, process output or object reprs.

Each test runs a real scenario with every logger at DEBUG (a recording handler on the root logger
plus pytest's caplog), registers the secrets the scenario handled (keys it generated, tokens it
minted, passwords it stored) with :class:`~tests.hardening.secrets_scan.SecretScanner`, and scans
everything the product emitted or kept in the open. The fixtures of the area tests are imported,
not copied, so these scenarios are the same ones those tests check for behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest
from _pytest.logging import LogCaptureHandler

from cloudconnector.api import ROTATE_ANNOTATION
from cloudconnector.clouds.aws_api import RetryPolicy
from cloudconnector.clouds.azure import AzureIotHubProvisioner
from cloudconnector.clouds.azure_credentials import parse_connection_string
from cloudconnector.clouds.certs import self_signed
from cloudconnector.errors import ConnectorError, PermanentError, TransientError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.embedded import EmbeddedKeyStore
from cloudconnector.keystore.envelope import MASTER_KEY_ENV
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.model import EndpointType, ObjectRef
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.health import make_app, start_http
from cloudconnector.proxy.main import JsonFormatter
from cloudconnector.proxy.server import Proxy
from cloudconnector.ratelimit import RateLimiter
from cloudconnector.routes import Route
from tests.aws import conftest as aws_fx
from tests.aws.conftest import Recorder, VaultRoles, fake_credentials, make_device
from tests.azure import conftest as azure_fx
from tests.azure.conftest import HUB_HOST, azure_endpoint
from tests.azure.conftest import new_device as azure_device
from tests.azure.hub_double import HubDouble, new_key
from tests.hardening.secrets_scan import (
    RecordingHandler,
    SecretScanner,
    exception_texts,
    hint,
    pem_slices,
)
from tests.operator import conftest as operator_fx
from tests.operator.conftest import DEVICES, ENDPOINTS, Cluster, Fleet, OperatorProcess, Vault
from tests.proxy.conftest import Client, Pki, World, proxy_config
from tests.standalone import conftest as standalone_fx
from tests.standalone.conftest import Site
from tests.support.pki import CA
from tests.support.procs import Bao, free_port, port_open, wait_for

Texts = list[tuple[str, str]]

# The AWS tests' fixtures, under their own names (pytest finds fixtures by module attribute).
moto = aws_fx.moto
vault_roles = aws_fx.vault_roles
keys = aws_fx.keys
reader = aws_fx.reader
namespace = aws_fx.namespace
make_provisioner = aws_fx.make_provisioner
azure_ca = azure_fx.azure_ca
site = standalone_fx.site
clean_env = standalone_fx.clean_env
cluster = operator_fx.cluster
vault = operator_fx.vault
fleet = operator_fx.fleet
operator_env = operator_fx.operator_env


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[RecordingHandler]:
    """Every logger at DEBUG, every record kept: on the root logger and on non-propagating ones."""
    caplog.set_level(logging.DEBUG)
    handler = RecordingHandler()
    root = logging.getLogger()
    # pytest's report handler would print the records of a failing test, leaked secrets included.
    reporting = [h for h in root.handlers if isinstance(h, LogCaptureHandler) and h is not caplog.handler]
    muted = {h: h.level for h in reporting}
    for h in muted:
        h.setLevel(logging.CRITICAL + 1)
    known = logging.root.manager.loggerDict.items()
    saved = {name: lg.level for name, lg in known if isinstance(lg, logging.Logger)}
    root_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    isolated: list[logging.Logger] = []
    for name in saved:
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG)
        if not lg.propagate:
            lg.addHandler(handler)
            isolated.append(lg)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        for h, level in muted.items():
            h.setLevel(level)
        for lg in isolated:
            lg.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def captured(handler: RecordingHandler, caplog: pytest.LogCaptureFixture) -> Texts:
    """Everything the logs hold, for the scan; caplog is emptied once read, as it holds secrets."""
    texts = list(handler.texts())
    texts.append(("caplog text", caplog.text))
    texts += [(f"caplog record #{i}", r.getMessage()) for i, r in enumerate(caplog.records)]
    as_json = JsonFormatter()  # the cluster proxy's log format, extra fields included
    texts += [(f"log record #{i} as JSON", as_json.format(r)) for i, r in enumerate(handler.records)]
    caplog.clear()
    return texts


def vault_secrets(scanner: SecretScanner, bao: Bao, roles: VaultRoles) -> None:
    scanner.add("vault root token", bao.token)
    scanner.add("vault operator token", roles.operator_token)
    scanner.add("vault proxy token", roles.proxy_token)


# ---------------------------------------------------------------- the scanner itself


def test_scanner_finds_a_planted_key_and_token_in_a_log_line(
    logs: RecordingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = self_signed("planted")
    token = "hvs." + uuid.uuid4().hex
    scanner = SecretScanner()
    scanner.add_private_key("planted key", key)
    scanner.add("planted token", token)
    body = pem_slices(key)[1]
    log = logging.getLogger("cloudconnector.planted")
    log.debug("harmless line")
    log.debug("fetched %s", {"key": key.decode()})  # the whole PEM, as a repr with escaped newlines
    log.warning("token was %s", token)
    log.info("a fragment: %s", body[3:-3])  # too short a slice to match: not reported
    try:
        raise RuntimeError(f"login failed for {token}")
    except RuntimeError:
        log.exception("vault said no")

    mine = RecordingHandler()
    mine.records = [r for r in logs.records if r.name == log.name]
    caplog.clear()  # the planted secrets stay out of the test report
    findings = scanner.scan(mine.texts())
    where = {(f.label, f.where.split(" (")[0]) for f in findings}
    assert ("planted key", "log record #1") in where
    assert ("private key block", "log record #1") in where
    assert ("planted token", "log record #2") in where
    assert ("planted token", "log record #4") in where  # via exc_info, not the message
    assert not any(f.where.startswith(("log record #0 ", "log record #3 ")) for f in findings)
    with pytest.raises(AssertionError) as failed:
        scanner.assert_clean(mine.texts())
    report = str(failed.value)
    assert "log record #2" in report and hint(token) in report
    assert token not in report and token[4:] not in report and body not in report


def test_scanner_finds_wrapped_and_encoded_spellings() -> None:
    _, key = self_signed("wrapped")
    secret = "Ab+/cd==" + uuid.uuid4().hex
    scanner = SecretScanner()
    scanner.add_private_key("key", key)
    scanner.add("sas", secret)
    body = "".join(key.decode().splitlines()[1:-1])
    rewrapped = "\n".join(body[i : i + 50] for i in range(0, len(body), 50))  # other line length
    found = scanner.scan(
        [
            ("rewrapped", rewrapped),
            ("escaped twice", repr(repr({"key": key.decode()}))),
            ("json", json.dumps({"k": key.decode()})),
            ("url", f"sig={quote(secret, safe='')}"),
            ("clean", "nothing to see " * 20),
        ]
    )
    by_value = {f.where for f in found if f.label in ("key", "sas")}  # not just the PEM marker
    assert by_value == {"rewrapped", "escaped twice", "json", "url"}
    with pytest.raises(ValueError):
        scanner.add("too short", "abc")


@pytest.mark.parametrize("rsa_bits", [None, 2048], ids=["ec", "rsa"])
def test_scanner_does_not_take_a_certificate_for_its_key(rsa_bits: int | None) -> None:
    """The public parts of a key (the EC point that ends the block, the RSA modulus) are in the
    certificate too; a certificate in a log is not a leak."""
    issued = CA().issue("device", client=True, rsa_bits=rsa_bits)
    scanner = SecretScanner()
    scanner.add_private_key("key", issued.key_pem)
    cert_body = "".join(issued.cert_pem.splitlines()[1:-1])
    assert scanner.scan([("cert", issued.cert_pem), ("cert body", cert_body)]) == []
    assert {f.where for f in scanner.scan([("key", issued.key_pem)])} == {"key"}


# ---------------------------------------------------------------- AWS IoT Core against moto


async def test_aws_provision_rotate_deprovision_leak_nothing(
    logs: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
    make_provisioner: Any,
    keys: VaultKeyStore,
    reader: VaultKeyStore,
    vault_roles: VaultRoles,
    bao: Bao,
    namespace: str,
) -> None:
    creds = fake_credentials() | {"AWS_SESSION_TOKEN": "session-" + uuid.uuid4().hex + uuid.uuid4().hex}
    scanner = SecretScanner()
    vault_secrets(scanner, bao, vault_roles)
    scanner.add("aws secret access key", creds["AWS_SECRET_ACCESS_KEY"])
    scanner.add("aws session token", creds["AWS_SESSION_TOKEN"])
    texts: Texts = []

    prov = make_provisioner(credentials=creds)
    device = make_device(namespace, 1)
    rec = Recorder()
    first = await prov.provision(device, {}, rec, keys)
    scanner.add_private_key("first device key", (await reader.get(device.ref)).private_key_pem)
    rotated = await prov.rotate(replace(device, rotate_token="r1"), rec.last, rec, keys)
    material = await reader.get(device.ref)
    scanner.add_private_key("rotated device key", material.private_key_pem)
    assert rotated.certificate_id != first.certificate_id
    done = Recorder()
    await prov.deprovision(device, rec.last, done)

    # Failure paths: a cloud that does not answer, and the key store refusing a wrong token.
    down = make_provisioner(
        f"http://127.0.0.1:{free_port()}",
        credentials=creds,
        retry=RetryPolicy(attempts=2, base=0.01, cap=0.02, give_up_delay=0.1),
    )
    with pytest.raises((TransientError, PermanentError)) as unreachable:
        await down.provision(make_device(namespace, 2), {}, Recorder(), keys)
    texts += [("exception: cloud unreachable", t) for t in exception_texts(unreachable.value)]
    wrong_token = "hvs.wrong-" + uuid.uuid4().hex
    scanner.add("wrong vault token", wrong_token)
    bad = VaultKeyStore(VaultConfig(address=vault_roles.url, token=wrong_token))
    try:
        with pytest.raises(Exception) as refused:  # any error: its text is what matters
            await bad.put(device.ref, material, {})
        texts += [("exception: vault refused", t) for t in exception_texts(refused.value)]
    finally:
        bad.close()

    # What an operator would persist and show: progress (status.progress), identities, reprs.
    for i, progress in enumerate(rec.saved + done.saved):
        texts.append((f"checkpointed progress #{i}", repr(progress)))
    texts += [("identity repr", repr(first)), ("identity repr", repr(rotated))]
    texts += [("key material repr", repr(material)), ("key material str", str(material))]
    config = VaultConfig(address=vault_roles.url, token=vault_roles.proxy_token)
    texts += [("vault config repr", repr(config))]
    texts += [("key store repr", repr(keys)), ("provisioner repr", repr(prov))]
    texts += captured(logs, caplog)

    assert len(logs.records) > 20  # botocore and urllib3 did log at DEBUG: the scan had material
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned > 40


# ---------------------------------------------------------------- Azure IoT Hub against the registry double


class RecordingHub(HubDouble):
    """The registry double, also keeping each Authorization header so its SAS signature is known."""

    def __init__(self, host_name: str, ca: CA) -> None:
        super().__init__(host_name, ca)
        self.authorizations: list[str] = []

    def _authorize(self, header: str, write: bool) -> Any:
        self.authorizations.append(header)
        return super()._authorize(header, write)

    def signatures(self) -> set[str]:
        sigs = set()
        for header in self.authorizations:
            fields = dict(p.split("=", 1) for p in header.split(" ", 1)[-1].split("&") if "=" in p)
            if fields.get("sig"):
                sigs.add(unquote(fields["sig"]))
        return sigs


@pytest.fixture
async def hub(azure_ca: CA) -> AsyncIterator[RecordingHub]:
    double = RecordingHub(HUB_HOST, azure_ca)
    async with double.serve():
        yield double


async def test_azure_provision_rotate_deprovision_leak_nothing(
    logs: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
    hub: RecordingHub,
    azure_ca: CA,
    keys: VaultKeyStore,
    reader: VaultKeyStore,
    vault_roles: VaultRoles,
    bao: Bao,
) -> None:
    scanner = SecretScanner()
    vault_secrets(scanner, bao, vault_roles)
    shared_key = hub.policies["registryReadWrite"].key
    scanner.add("azure SharedAccessKey", shared_key)
    texts: Texts = []
    endpoint = azure_endpoint(hub, azure_ca.cert_pem)
    prov = AzureIotHubProvisioner(endpoint, {"connectionString": hub.connection_string()}, RateLimiter(1000))
    device = azure_device()
    rec = Recorder()
    try:
        await prov.check()
        first = await prov.provision(device, {}, rec, keys)
        scanner.add_private_key("first device key", (await reader.get(device.ref)).private_key_pem)
        rotated = await prov.rotate(replace(device, rotate_token="r1"), rec.last, rec, keys)
        scanner.add_private_key("rotated device key", (await reader.get(device.ref)).private_key_pem)
        await prov.deprovision(device, rec.last, rec)
    finally:
        await prov.aclose()
    assert rotated.thumbprint != first.thumbprint

    # Failure paths: a wrong key (401 from the hub) and a malformed connection string.
    wrong_key = new_key()
    scanner.add("wrong SharedAccessKey", wrong_key)
    for label, conn in [
        ("wrong key", hub.connection_string(key=wrong_key)),
        ("malformed", f"HostName={HUB_HOST};SharedAccessKey={wrong_key}"),
    ]:
        bad = AzureIotHubProvisioner(endpoint, {"connectionString": conn}, RateLimiter(1000))
        try:
            with pytest.raises(ConnectorError) as refused:
                await bad.provision(azure_device(), {}, Recorder(), keys)
        finally:
            await bad.aclose()
        texts += [(f"exception: {label}", t) for t in exception_texts(refused.value)]

    # One signature per token the SDK made (it reuses one for its lifetime), and one per wrong key.
    signed = 0
    for i, sig in enumerate(sorted(hub.signatures())):
        scanner.add(f"SAS signature #{i}", sig)
        signed += 1
    assert signed >= 2  # a count only: a failing assert must not print the signatures
    for i, progress in enumerate(rec.saved):
        texts.append((f"checkpointed progress #{i}", repr(progress)))
    texts += [("identity repr", repr(first)), ("identity repr", repr(rotated))]
    texts += [("registry credentials repr", repr(parse_connection_string(hub.connection_string())))]
    texts += [("provisioner repr", repr(prov)), ("endpoint repr", repr(endpoint))]
    texts += captured(logs, caplog)
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned > 20


# ---------------------------------------------------------------- the proxy with keys from OpenBao


async def _connack(port: int, source: str, packet: Connect) -> bytes:
    """A raw 3.1.1 device: CONNECT from ``source``, then the 4-byte CONNACK (or what came before EOF)."""
    reader_, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(codec.encode(packet))
        try:
            return await asyncio.wait_for(reader_.readexactly(4), 20)
        except asyncio.IncompleteReadError as e:
            return e.partial
    finally:
        writer.close()


async def test_proxy_relay_and_failures_leak_nothing(
    logs: RecordingHandler,
    caplog: pytest.LogCaptureFixture,
    pki: Pki,
    world: World,
    admin: Client,
    keys: VaultKeyStore,
    reader: VaultKeyStore,
    vault_roles: VaultRoles,
    bao: Bao,
) -> None:
    scanner = SecretScanner()
    vault_secrets(scanner, bao, vault_roles)
    texts: Texts = []

    async def store(route: Route, *, password: bool = False, key_of: Route | None = None) -> None:
        """Put the route's credentials in Vault (optionally with a password, or someone else's key)."""
        issued = world.issue(route)
        key = world.issue(key_of).key_pem if key_of is not None else issued.key_pem
        secret = f"mqtt-pw-{uuid.uuid4().hex}" if password else None
        material = KeyMaterial(
            issued.cert_pem, key, username="gateway-user" if password else None, password=secret
        )
        await keys.put(route.device, material, {"certificateId": route.certificate_id})
        scanner.add_private_key(f"key of {route.device.name}", key)
        scanner.add(f"mqtt password of {route.device.name}", secret)

    relayed = world.add()
    await store(relayed)
    generic = replace(world.add(ready=False), endpoint_type=EndpointType.MQTT)
    await store(generic, password=True)
    down = replace(world.add(ready=False, port=free_port()), endpoint_type=EndpointType.MQTT)
    await store(down, password=True)
    untrusted = replace(
        world.add(ready=False), endpoint_type=EndpointType.MQTT, ca_pem=CA("Other CA").cert_pem
    )
    await store(untrusted, password=True)
    unusable = world.add(ready=False)
    await store(unusable, key_of=world.add(ready=False))  # a key that does not match the certificate
    missing = world.add(ready=False)  # routed, but nothing in Vault
    for route in (generic, down, untrusted, unusable, missing):
        world.directory.put(route)

    proxy = Proxy(proxy_config(pki), world.directory, reader)
    async with proxy:
        runner, http = await start_http(make_app(proxy.metrics, lambda: proxy.accepting), "127.0.0.1", 0)
        try:
            port = proxy.ports["mqtt"]
            await asyncio.to_thread(admin.subscribe, f"{relayed.client_id}/#", 1)
            dev = Client("d", bind=relayed.ip or "")
            try:
                assert await asyncio.to_thread(dev.connect, port) == 0
                await asyncio.to_thread(dev.publish, f"{relayed.client_id}/up", b"via vault", 1)
                assert (await asyncio.to_thread(admin.expect)).payload == b"via vault"
            finally:
                await asyncio.to_thread(dev.close)
            device_password = b"device-" + uuid.uuid4().hex.encode()
            scanner.add("the device's own password", device_password)
            hello = Connect("x", username="device-user", password=device_password)
            answers = {
                name: await _connack(port, route.ip or "", hello)
                for name, route in [
                    ("generic", generic),
                    ("down", down),
                    ("untrusted", untrusted),
                    ("unusable", unusable),
                    ("missing", missing),
                ]
            }
            answers["unknown"] = await _connack(port, "127.0.9.9", hello)
            # The proxy's own Vault token refused (expired, revoked): the device is turned away.
            wrong = "hvs.wrong-" + uuid.uuid4().hex
            scanner.add("wrong proxy vault token", wrong)
            locked_out = VaultKeyStore(VaultConfig(address=vault_roles.url, token=wrong))
            try:
                async with Proxy(proxy_config(pki), world.directory, locked_out) as other:
                    answers["locked out"] = await _connack(other.ports["mqtt"], relayed.ip or "", hello)
            finally:
                locked_out.close()
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{http}/metrics") as r,
            ):
                texts.append(("proxy /metrics", await r.text()))
        finally:
            await runner.cleanup()
    assert answers["generic"][:4] == b"\x20\x02\x00\x00"
    assert {answers[n][:4] for n in ("down", "untrusted")} == {b"\x20\x02\x00\x03"}
    assert answers["unknown"][:4] == b"\x20\x02\x00\x05"
    assert {answers[n][:3] for n in ("unusable", "missing", "locked out")} == {b"\x20\x02\x00"}
    texts += [(f"answer to {n}", repr(a)) for n, a in answers.items()]
    texts += [("proxy config repr", repr(proxy_config(pki))), ("reader repr", repr(reader))]
    proxy_lines = [r.getMessage() for r in logs.records if r.name.startswith("cloudconnector.proxy")]
    refusals = sum(line.startswith("device refused") for line in proxy_lines)
    assert refusals == 6  # each failure path said why: upstream, TLS, key, no key, unknown, Vault
    texts += captured(logs, caplog)
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned > 20


# ---------------------------------------------------------------- cloud-connector run / status


def _cli(site: Site, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudconnector.cli", "-v", *args, "--state", str(site.state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _stored_key(site: Site, env: dict[str, str], name: str) -> bytes:
    store = EmbeddedKeyStore.open(site.state / "keys.db", site.state / "master.key", env)
    return (await store.reader().get(ObjectRef(site.namespace, name))).private_key_pem


def test_standalone_run_and_status_leak_nothing(site: Site, clean_env: dict[str, str]) -> None:
    scanner = SecretScanner()
    access, secret = fake_credentials().values()
    scanner.add("aws secret access key", secret)
    master = base64.b64encode(os.urandom(32)).decode()
    scanner.add("embedded store master key", master)
    env = {**clean_env, MASTER_KEY_ENV: master}
    texts: Texts = []
    cloud_port = free_port()  # the data endpoint: nothing listens there

    def manifests(*devices: dict[str, Any]) -> None:
        iam, endpoint = site.endpoint()
        endpoint["spec"]["port"] = cloud_port
        iam["stringData"] = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
        site.write("endpoint.yaml", [iam, endpoint, site.group("meters")])
        site.write("devices.yaml", list(devices))

    def ran(what: str, done: subprocess.CompletedProcess[str], code: int = 0) -> None:
        texts.extend([(f"stdout of {what}", done.stdout), (f"stderr of {what}", done.stderr)])
        assert done.returncode == code, f"{what} exited {done.returncode}"  # output not shown: it is scanned

    manifests(site.device(0, ip="127.21.0.2"), site.device(1))
    ran("run --once", _cli(site, env, "run", "-f", str(site.manifests), "--once"))
    first = {name: asyncio.run(_stored_key(site, env, name)) for name in ("meter-0000", "meter-0001")}
    for name, key in first.items():
        scanner.add_private_key(f"first key of {name}", key)

    rotating = site.device(0, ip="127.21.0.2")
    rotating["metadata"]["annotations"] = {ROTATE_ANNOTATION: "now"}
    manifests(rotating, site.device(1))
    ran("run --once (rotation)", _cli(site, env, "run", "-f", str(site.manifests), "--once"))
    rotated = asyncio.run(_stored_key(site, env, "meter-0000"))
    changed = rotated != first["meter-0000"]
    assert changed  # a bool, so that a failure does not print the keys
    scanner.add_private_key("rotated key of meter-0000", rotated)
    ran("status all", _cli(site, env, "status", "all"))

    # Serving: the device's key is read for its connection (to a cloud port nobody listens on).
    port, http = free_port(), free_port()
    watch = [
        *("run", "-f", str(site.manifests), "--watch", "--interval", "0.2", "--bind", "127.0.0.1"),
        *("--mqtt-port", str(port), "--http-port", str(http), "--state", str(site.state)),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudconnector.cli", "-v", *watch],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Generous: a loaded CI machine starts Python with boto3 slowly.
        listening = lambda: proc.poll() is not None or port_open("127.0.0.1", port)  # noqa: E731
        wait_for(listening, timeout=90, what="standalone proxy")
        assert proc.poll() is None, f"run --watch exited with {proc.returncode}"  # output is scanned below
        hello = Connect("meter", username="u", password=b"p" * 12)
        # Until the first pass has published the routes, the device is unknown (5); then its key is
        # read and the unreachable cloud answers server unavailable (3).
        unavailable = lambda: asyncio.run(_connack(port, "127.21.0.2", hello))[3] == 3  # noqa: E731
        wait_for(unavailable, timeout=60, what="routed device")
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
            texts.append(("standalone /metrics", r.read().decode()))
        # Deleting a device deprovisions it while the process watches.
        manifests(site.device(0, ip="127.21.0.2"))
        wait_for(lambda: len(site.things()) == 1, timeout=60, what="deprovisioning")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    texts += [("stdout of run --watch", out), ("stderr of run --watch", err)]
    assert "proxy listening" in err

    for path in sorted(site.state.iterdir()):
        if path.name != "master.key":  # the key file is where the master key is meant to be
            texts.append((f"state file {path.name}", path.read_bytes().decode("latin-1")))
    assert any(where.startswith("state file state.db") for where, _ in texts)
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned >= 10


# ---------------------------------------------------------------- the kopf operator against kmock


async def test_operator_statuses_events_and_output_leak_nothing(
    cluster: Cluster,
    fleet: Fleet,
    vault: Vault,
    bao: Bao,
    operator_env: dict[str, str],
    tmp_path: Path,
    hub: RecordingHub,
    azure_ca: CA,
) -> None:
    scanner = SecretScanner()
    scanner.add("vault root token", bao.token)
    scanner.add("vault operator token", vault.operator_token)
    scanner.add("vault proxy token", vault.proxy_token)
    access, secret = fake_credentials().values()
    scanner.add("aws secret access key", secret)
    await cluster.secret("iam", {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret})
    own = CA().issue("manual-device", client=True)
    weak = CA().issue("weak-device", client=True, rsa_bits=1024)
    await cluster.secret("own-cert", {"tls.crt": own.cert_pem, "tls.key": own.key_pem})
    await cluster.secret("weak-cert", {"tls.crt": weak.cert_pem, "tls.key": weak.key_pem})
    scanner.add_private_key("manual device key", own.key_pem)
    scanner.add_private_key("weak manual key", weak.key_pem)

    # Azure: a hub policy key that works, and one the hub refuses.
    shared_key, wrong_key = hub.policies["registryReadWrite"].key, new_key()
    scanner.add("azure SharedAccessKey", shared_key)
    scanner.add("wrong SharedAccessKey", wrong_key)
    await cluster.secret("hub", {"connectionString": hub.connection_string()})
    await cluster.secret("hub-wrong", {"connectionString": hub.connection_string(key=wrong_key)})

    op = OperatorProcess({**operator_env, "CLOUDCONNECTOR_LOG_LEVEL": "DEBUG"}, tmp_path / "operator.log")
    proxy_keys = VaultKeyStore(VaultConfig(address=vault.url, token=vault.proxy_token))
    op.start()
    try:
        await fleet.endpoint("aws", secret="iam", make_secret=False)
        await fleet.group("g", "aws")
        # An endpoint whose cloud does not answer: its errors go to status and events.
        down = {"region": "eu-west-1", "endpointUrl": f"http://127.0.0.1:{free_port()}"}
        down["credentialsSecretRef"] = {"name": "iam"}  # type: ignore[assignment]
        await cluster.create(ENDPOINTS, "down", {"type": "AwsIotCore", "aws": down})
        await fleet.group("g-down", "down")
        for secret_name in ("hub", "hub-wrong"):
            azure_spec = {"hostName": HUB_HOST, "registryUrl": hub.url}
            azure_spec["credentialsSecretRef"] = {"name": secret_name}  # type: ignore[assignment]
            spec = {"type": "AzureIotHub", "caCertificate": azure_ca.cert_pem, "azure": azure_spec}
            await cluster.create(ENDPOINTS, secret_name, spec)
        await fleet.group("g-hub", "hub")
        await fleet.device("on-hub", "g-hub")
        for name in ("a", "b"):
            await fleet.device(name, "g")
        await fleet.device("manual", "g", credentialsSecretRef={"name": "own-cert"})
        await fleet.device("weak", "g", credentialsSecretRef={"name": "weak-cert"})
        await fleet.device("stranded", "g-down")

        before = {}
        for name in ("a", "b"):
            before[name] = (await cluster.wait_phase(DEVICES, name, "Ready"))["status"]
            material = await proxy_keys.get(ObjectRef(cluster.namespace, name))
            scanner.add_private_key(f"key of {name}", material.private_key_pem)
        await cluster.wait_phase(DEVICES, "manual", "Ready")
        await cluster.wait_phase(DEVICES, "weak", "Failed")
        await cluster.wait_phase(ENDPOINTS, "down", "Error")
        await cluster.wait_phase(ENDPOINTS, "hub-wrong", "Error")
        await cluster.wait_phase(DEVICES, "on-hub", "Ready")
        on_hub = await proxy_keys.get(ObjectRef(cluster.namespace, "on-hub"))
        scanner.add_private_key("key of on-hub", on_hub.private_key_pem)

        await cluster.patch(DEVICES, "a", {"metadata": {"annotations": {ROTATE_ANNOTATION: "now"}}})
        await cluster.wait_for(
            DEVICES, "a", lambda o: (o or {}).get("status", {}).get("rotation", {}).get("token") == "now"
        )
        rotated = await proxy_keys.get(ObjectRef(cluster.namespace, "a"))
        scanner.add_private_key("rotated key of a", rotated.private_key_pem)
        await cluster.delete(DEVICES, "b")
        await cluster.wait_gone(DEVICES, "b")
    finally:
        op.stop()
        proxy_keys.close()

    for i, sig in enumerate(sorted(hub.signatures())):
        scanner.add(f"SAS signature #{i}", sig)
    texts: Texts = [("operator output", op.output())]
    events = 0
    for (resource, ns, name), obj in cluster.kmock.objects.items():
        if resource.plural == "secrets":
            continue  # where credentials are meant to be
        events += resource.plural == "events"
        texts.append((f"{resource.plural} {ns}/{name} (every version)", repr(obj)))
    assert events >= 5
    assert '"level": "debug"' in texts[0][1]  # the operator did log at DEBUG (JSON lines)
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned > 10


def test_standalone_with_vault_tokens_leaks_nothing(
    site: Site, clean_env: dict[str, str], vault_roles: VaultRoles, bao: Bao
) -> None:
    scanner = SecretScanner()
    vault_secrets(scanner, bao, vault_roles)
    access, secret = fake_credentials().values()
    scanner.add("aws secret access key", secret)
    site.namespace = f"sa-{site.prefix.rstrip('-')}"  # a Vault slot of its own
    iam, endpoint = site.endpoint()
    iam["stringData"] = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    site.write("endpoint.yaml", [iam, endpoint, site.group("meters")])
    site.write("devices.yaml", [site.device(0), site.device(1)])
    env = {
        **clean_env,
        "VAULT_ADDR": vault_roles.url,
        "VAULT_TOKEN": vault_roles.operator_token,
        "CLOUDCONNECTOR_PROXY_VAULT_TOKEN": vault_roles.proxy_token,
    }
    texts: Texts = []
    done = _cli(site, env, "run", "-f", str(site.manifests), "--once")
    texts += [("stdout of run --once", done.stdout), ("stderr of run --once", done.stderr)]
    assert done.returncode == 0
    reader_ = VaultKeyStore(VaultConfig(address=vault_roles.url, token=vault_roles.proxy_token))
    try:
        for i in (0, 1):
            ref = ObjectRef(site.namespace, f"meter-{i:04d}")
            scanner.add_private_key(f"key of {ref.name}", asyncio.run(reader_.get(ref)).private_key_pem)
    finally:
        reader_.close()

    # A token Vault does not know: the run fails, and says so without repeating it.
    wrong = "hvs.wrong-" + uuid.uuid4().hex
    scanner.add("wrong vault token", wrong)
    site.write("devices.yaml", [site.device(0), site.device(1), site.device(2)])
    refused = _cli(site, {**env, "VAULT_TOKEN": wrong}, "run", "-f", str(site.manifests), "--once")
    texts += [("stdout of refused run", refused.stdout), ("stderr of refused run", refused.stderr)]
    assert refused.returncode != 0
    status = _cli(site, env, "status", "all")
    texts += [("stdout of status", status.stdout), ("stderr of status", status.stderr)]
    assert status.returncode == 0 and "meter-0002" in status.stdout
    for path in sorted(site.state.iterdir()):
        texts.append((f"state file {path.name}", path.read_bytes().decode("latin-1")))
    scanned = scanner.assert_clean(texts)  # apart: pytest would print the texts of a failed assert
    assert scanned >= 7
