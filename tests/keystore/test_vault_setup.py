"""Preparing Vault: policy files, the bootstrap script and function, settings from the environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import hvac
import pytest

from cloudconnector.errors import InvalidSpec
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig
from cloudconnector.keystore.vault_setup import (
    OPERATOR_POLICY,
    PROXY_POLICY,
    Layout,
    bootstrap,
    operator_policy,
    proxy_policy,
)
from cloudconnector.model import ObjectRef
from tests.keystore.conftest import make_token
from tests.support.pki import CA
from tests.support.procs import Bao

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "vault"


def test_policy_files_are_the_rendered_defaults() -> None:
    assert (DEPLOY / "operator.hcl").read_text() == operator_policy()
    assert (DEPLOY / "proxy.hcl").read_text() == proxy_policy()


def test_operator_policy_grants_no_read_on_data_and_no_decrypt() -> None:
    text = operator_policy()
    data_block = text.split('path "secret/data/cloud-connector/*"')[1].split("}")[0]
    assert '"read"' not in data_block
    assert "decrypt" not in text.replace("no decrypt grant", "")
    assert "export" not in text


async def test_bootstrap_script_prepares_a_blank_server(spare_bao: Bao, tmp_path: Path) -> None:
    ca_file = tmp_path / "k8s-ca.pem"
    ca_file.write_text(CA("k8s test CA").cert_pem)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "VAULT_ADDR": spare_bao.url,
        "VAULT_TOKEN": spare_bao.token,
        "CLOUDCONNECTOR_VAULT_KV_MOUNT": "devices",
        "CLOUDCONNECTOR_VAULT_PREFIX": "cc",
        "CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT": "cc-transit",
        "CC_KUBERNETES_AUTH": "1",
        "CC_KUBERNETES_HOST": "https://127.0.0.1:6443",
        "CC_KUBERNETES_CA_FILE": str(ca_file),
    }
    for _ in range(2):  # a second run changes nothing and does not fail
        await asyncio.to_thread(
            subprocess.run,
            [str(DEPLOY / "bootstrap.sh")],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )

    root = hvac.Client(url=spare_bao.url, token=spare_bao.token)
    layout = Layout(kv_mount="devices", prefix="cc", transit_mount="cc-transit")
    assert root.sys.read_policy(OPERATOR_POLICY)["data"]["rules"] == operator_policy(layout)
    assert root.sys.read_policy(PROXY_POLICY)["data"]["rules"] == proxy_policy(layout)
    role = root.read("auth/kubernetes/role/cloud-connector-proxy")["data"]
    assert role["bound_service_account_names"] == ["cloud-connector-proxy"]
    assert role["token_policies"] == [PROXY_POLICY]

    # The store works on that layout with tokens of those policies.
    issued = CA().issue("dev")
    material = KeyMaterial(certificate_pem=issued.cert_pem, private_key_pem=issued.key_pem)
    base = VaultConfig(
        address=spare_bao.url, token="-", kv_mount="devices", prefix="cc", transit_mount="cc-transit"
    )
    operator = VaultKeyStore(replace(base, token=make_token(root, OPERATOR_POLICY)))
    proxy = VaultKeyStore(replace(base, token=make_token(root, PROXY_POLICY)))
    device = ObjectRef("ns", "dev")
    info = await operator.put(device, material, {"k": "v"})
    assert info.location == "vault:devices/cc/ns/dev"
    assert await proxy.get(device) == material


def test_bootstrap_function_is_idempotent_and_refuses_kv_v1(spare_bao: Bao) -> None:
    root = hvac.Client(url=spare_bao.url, token=spare_bao.token)
    bootstrap(root)
    bootstrap(root)
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    assert mounts["transit/"]["type"] == "transit"
    root.sys.enable_secrets_engine("kv", path="old-kv", options={"version": "1"})
    with pytest.raises(RuntimeError, match="old-kv"):
        bootstrap(root, Layout(kv_mount="old-kv"))


def test_config_from_environment() -> None:
    cfg = VaultConfig.from_env(
        {
            "VAULT_ADDR": "https://vault.example:8200/",
            "VAULT_CACERT": "/etc/ca.pem",
            "CLOUDCONNECTOR_VAULT_AUTH": "kubernetes",
            "CLOUDCONNECTOR_VAULT_ROLE": "cloud-connector-proxy",
            "CLOUDCONNECTOR_VAULT_KV_MOUNT": "kv",
            "CLOUDCONNECTOR_VAULT_PREFIX": "devices",
            "CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT": "tr",
        }
    )
    assert cfg.address == "https://vault.example:8200"
    assert cfg.auth is AuthMethod.KUBERNETES
    assert cfg.login_mount == "kubernetes"
    assert cfg.role == "cloud-connector-proxy"
    assert cfg.verify == "/etc/ca.pem"
    assert (cfg.kv_mount, cfg.prefix, cfg.transit_mount) == ("kv", "devices", "tr")
    assert str(cfg.jwt_file) == "/var/run/secrets/kubernetes.io/serviceaccount/token"

    token_cfg = VaultConfig.from_env({"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "s.very-secret"})
    assert token_cfg.auth is AuthMethod.TOKEN
    assert "s.very-secret" not in repr(token_cfg)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"VAULT_ADDR": "vault:8200", "VAULT_TOKEN": "t"},
        {"VAULT_ADDR": "http://v"},  # token method without a token
        {"VAULT_ADDR": "http://v", "CLOUDCONNECTOR_VAULT_AUTH": "jwt"},  # no role
        {"VAULT_ADDR": "http://v", "CLOUDCONNECTOR_VAULT_AUTH": "ldap", "VAULT_TOKEN": "t"},
        {"VAULT_ADDR": "http://v", "VAULT_TOKEN": "t", "CLOUDCONNECTOR_VAULT_KV_MOUNT": "/secret"},
    ],
)
def test_config_rejects_incomplete_settings(env: dict[str, str]) -> None:
    with pytest.raises(InvalidSpec):
        VaultConfig.from_env(env)
