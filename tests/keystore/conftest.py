"""Fixtures for the key store tests: a bootstrapped OpenBao with operator and proxy tokens."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest

from cloudconnector.clouds.certs import self_signed
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.model import ObjectRef
from tests.support.pki import CA
from tests.support.procs import Bao, free_port, port_open, run_bao, stop, wait_for
from tests.support.vault import bootstrapped
from tests.support.vault import mint_token as make_token


@dataclass
class Roles:
    url: str
    root: hvac.Client
    operator_token: str
    proxy_token: str


@pytest.fixture(scope="session")
def roles(bao: Bao) -> Roles:
    root = bootstrapped(bao)
    return Roles(bao.url, root, make_token(root, OPERATOR_POLICY), make_token(root, PROXY_POLICY))


@pytest.fixture
def operator(roles: Roles) -> Iterator[VaultKeyStore]:
    store = VaultKeyStore(VaultConfig(address=roles.url, token=roles.operator_token))
    yield store
    store.close()


@pytest.fixture
def proxy(roles: Roles) -> Iterator[VaultKeyStore]:
    store = VaultKeyStore(VaultConfig(address=roles.url, token=roles.proxy_token))
    yield store
    store.close()


@pytest.fixture
def device() -> ObjectRef:
    return ObjectRef("keystore-tests", f"dev-{uuid.uuid4().hex[:10]}.sim")


@pytest.fixture(scope="session")
def material() -> KeyMaterial:
    """A device's credentials with every optional part, made at run time."""
    cert, key = self_signed("device-under-test")
    return KeyMaterial(
        certificate_pem=cert,
        private_key_pem=key,
        ca_pem=CA().cert_pem,
        username="device-user",
        password="pw-" + uuid.uuid4().hex,
    )


@pytest.fixture
def spare_bao() -> Iterator[Bao]:
    """A private OpenBao for tests that break the server (seal, stop) or need a blank one."""
    with run_bao() as server:
        yield server


@dataclass
class SealableBao:
    bao: Bao
    unseal_key: str


@pytest.fixture
def sealable_bao(tmp_path: Path) -> Iterator[SealableBao]:
    """A private OpenBao dev server whose unseal key we keep, so a test can seal and unseal it."""
    exe = shutil.which("bao")
    assert exe is not None
    port = free_port()
    token = "test-root-" + os.urandom(8).hex()
    log = tmp_path / "bao.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=1) as r:
            return r.status == 200

    try:
        wait_for(healthy, what="bao")
        wait_for(lambda: b"Unseal Key:" in log.read_bytes(), what="bao unseal key")
        found = re.search(rb"Unseal Key: (\S+)", log.read_bytes())
        assert found is not None
        yield SealableBao(Bao(url, token, proc), found.group(1).decode())
    finally:
        stop(proc)


@pytest.fixture
def tls_bao(tmp_path: Path) -> Iterator[tuple[Bao, Path]]:
    """A private OpenBao dev server on HTTPS with its own generated CA; yields it and the CA file."""
    exe = shutil.which("bao")
    assert exe is not None
    port = free_port()
    token = "test-root-" + os.urandom(8).hex()
    certs = tmp_path / "bao-tls"
    certs.mkdir()
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "-dev",
            "-dev-tls",
            f"-dev-tls-cert-dir={certs}",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ca = certs / "vault-ca.pem"
    try:
        wait_for(lambda: ca.exists() and port_open("127.0.0.1", port), what="bao with TLS")
        yield Bao(f"https://127.0.0.1:{port}", token, proc), ca
    finally:
        stop(proc)
