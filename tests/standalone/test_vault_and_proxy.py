"""``cloud-connector run`` with keys in Vault (OpenBao), and the proxy it serves in the same process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import hvac

from cloudconnector.demo.devices import connect_packet, read_packet
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY, bootstrap
from tests.standalone.conftest import Site
from tests.standalone.test_cli_restart import phases, run_cli
from tests.support.procs import Bao, free_port, port_open, stop, wait_for


def token(root: hvac.Client, policy: str) -> str:
    created = root.auth.token.create(policies=[policy], no_default_policy=True, ttl="1h")
    return str(created["auth"]["client_token"])


def test_keys_go_to_vault_when_configured(site: Site, clean_env: dict[str, str], bao: Bao) -> None:
    root = hvac.Client(url=bao.url, token=bao.token)
    bootstrap(root)
    env = {
        **clean_env,
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": token(root, OPERATOR_POLICY),
        "CLOUDCONNECTOR_PROXY_VAULT_TOKEN": token(root, PROXY_POLICY),
    }
    site.namespace = f"sa-{site.prefix.rstrip('-')}"  # a Vault slot of its own under the default prefix
    site.standard(2)
    done = run_cli(site, env, "run", "-f", str(site.manifests), "--once")
    assert done.returncode == 0, done.stdout + done.stderr
    assert phases(site) == ["Ready", "Ready"]
    assert not (site.state / "keys.db").exists()
    stored = root.secrets.kv.v2.read_secret_version(
        path=f"cloud-connector/{site.namespace}/meter-0000", mount_point="secret"
    )
    assert stored["data"]["data"]  # the record exists; its private key is transit ciphertext
    assert "PRIVATE KEY" not in str(stored["data"]["data"])


async def _connack(port: int, source: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(connect_packet("any"))
        kind, body = await asyncio.wait_for(read_packet(reader), 15)
        assert kind == 2
        return body[1]
    finally:
        writer.close()


def test_run_serves_the_proxy_with_the_reconciled_routes(site: Site, clean_env: dict[str, str]) -> None:
    secret, endpoint = site.endpoint()
    endpoint["spec"]["port"] = free_port()  # nothing listens there: the cloud is unreachable
    site.write("endpoint.yaml", [secret, endpoint, site.group("meters")])
    site.write("devices.yaml", [site.device(0, ip="127.20.0.2")])
    port, http = free_port(), free_port()
    cmd = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(site.manifests), "--watch"]
    options = {"--interval": "0.2", "--bind": "127.0.0.1", "--mqtt-port": port, "--http-port": http}
    proc = subprocess.Popen(
        [*cmd, *(str(x) for kv in options.items() for x in kv), "--state", str(site.state)],
        env=clean_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="standalone proxy")
        wait_for(lambda: phases(site) == ["Ready"], what="provisioning")
        # An address no Device has: refused as not authorized (3.1.1 return code 5).
        assert asyncio.run(_connack(port, "127.20.0.9")) == 5
        # The provisioned device is routed, but its cloud is not there: server unavailable (3).
        assert asyncio.run(_connack(port, "127.20.0.2")) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=5) as ready:
            assert ready.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as metrics:
            assert b"cloudconnector" in metrics.read()
    finally:
        stop(proc)
