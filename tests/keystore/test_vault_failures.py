"""Vault unreachable, sealed or stopped; and no secret in any repr, error or log line."""

from __future__ import annotations

import asyncio
import logging
import traceback
from dataclasses import replace
from pathlib import Path

import hvac
import pytest

from cloudconnector.errors import ConnectorError, PermanentError, TransientError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY, bootstrap
from cloudconnector.model import ObjectRef
from tests.keystore.conftest import Roles, SealableBao, make_token
from tests.support.procs import Bao, free_port, stop


async def test_unreachable_vault_is_transient(device: ObjectRef, material: KeyMaterial) -> None:
    store = VaultKeyStore(VaultConfig(address=f"http://127.0.0.1:{free_port()}", token="unused", timeout=2))
    for call in (
        store.put(device, material, {}),
        store.describe(device),
        store.delete(device),
        store.get(device),
    ):
        with pytest.raises(TransientError) as err:
            await call
        assert err.value.reason == "VaultUnavailable"


async def test_sealed_then_stopped_vault_is_transient(
    spare_bao: Bao, device: ObjectRef, material: KeyMaterial
) -> None:
    root = hvac.Client(url=spare_bao.url, token=spare_bao.token)
    bootstrap(root)
    store = VaultKeyStore(VaultConfig(address=spare_bao.url, token=make_token(root, OPERATOR_POLICY)))
    await store.put(device, material, {})

    root.sys.seal()
    with pytest.raises(TransientError) as err:
        await store.put(device, material, {})
    assert err.value.reason == "VaultSealed"
    with pytest.raises(TransientError):
        await store.describe(device)

    stop(spare_bao.proc)
    with pytest.raises(TransientError) as err:
        await store.delete(device)
    assert err.value.reason == "VaultUnavailable"


async def test_no_secret_in_reprs_errors_or_logs(
    roles: Roles,
    operator: VaultKeyStore,
    proxy: VaultKeyStore,
    device: ObjectRef,
    material: KeyMaterial,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # including urllib3's request lines
    secrets = [
        roles.operator_token,
        roles.proxy_token,
        roles.root.token,
        material.private_key_pem.decode().splitlines()[1],
        str(material.password),
    ]
    errors: list[ConnectorError] = []

    await operator.put(device, material, {"thumbprint": "t"})
    got = await proxy.get(device)
    await operator.describe(device)
    for failing in (operator.get(device), proxy.put(device, material, {}), proxy.delete(device)):
        with pytest.raises(PermanentError) as err:
            await failing
        errors.append(err.value)
    bad = VaultKeyStore(VaultConfig(address=roles.url, token=roles.operator_token + "x"))
    with pytest.raises(PermanentError) as err:
        await bad.put(device, material, {})
    errors.append(err.value)
    down = VaultKeyStore(VaultConfig(address=f"http://127.0.0.1:{free_port()}", token=roles.proxy_token))
    with pytest.raises(TransientError) as terr:
        await down.get(device)
    errors.append(terr.value)

    texts = [
        caplog.text,
        repr(operator),
        repr(proxy),
        repr(operator.session),
        repr(operator.config),
        repr(got),
        repr(material),
        *("".join(traceback.format_exception(e)) for e in errors),
    ]
    assert caplog.records  # the store did log; the point is what it logged
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert "PRIVATE KEY" not in text


async def test_sealed_vault_loses_nothing_and_recovers(
    sealable_bao: SealableBao, device: ObjectRef, material: KeyMaterial
) -> None:
    root = hvac.Client(url=sealable_bao.bao.url, token=sealable_bao.bao.token)
    bootstrap(root)
    cfg = VaultConfig(address=sealable_bao.bao.url, token=make_token(root, OPERATOR_POLICY))
    operator = VaultKeyStore(cfg)
    proxy = VaultKeyStore(replace(cfg, token=make_token(root, PROXY_POLICY)))
    await operator.put(device, material, {"n": "1"})

    root.sys.seal()
    with pytest.raises(TransientError):
        await operator.put(device, material, {"n": "2"})
    with pytest.raises(TransientError):
        await proxy.get(device)

    root.sys.submit_unseal_key(sealable_bao.unseal_key)
    assert await proxy.get(device) == material  # what was stored before the outage is intact
    info = await operator.put(device, material, {"n": "2"})  # the retry goes through
    assert dict(info.metadata) == {"n": "2"}


async def test_tls_vault_with_its_ca_bundle(
    tls_bao: tuple[Bao, Path], device: ObjectRef, material: KeyMaterial
) -> None:
    server, ca = tls_bao
    root = hvac.Client(url=server.url, token=server.token, verify=str(ca))
    await asyncio.to_thread(bootstrap, root)
    cfg = VaultConfig(address=server.url, token=make_token(root, OPERATOR_POLICY), ca_bundle=ca)
    await VaultKeyStore(cfg).put(device, material, {})
    proxy = VaultKeyStore(replace(cfg, token=make_token(root, PROXY_POLICY)))
    assert await proxy.get(device) == material

    # Without the CA the server is not trusted: nothing is sent, and the error says why.
    with pytest.raises(TransientError) as err:
        await VaultKeyStore(replace(cfg, ca_bundle=None)).describe(device)
    assert err.value.reason == "VaultTLSFailed"
