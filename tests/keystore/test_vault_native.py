"""The proxy's credential reads over aiohttp (keystore/vault_http.py), through a real OpenBao: the
fetch and its kept connection, re-login and renewal, and failures that read exactly as they did
when the same requests went through hvac."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from asyncio.subprocess import PIPE
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import hvac
import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric import rsa

from cloudconnector.errors import ConnectorError, PermanentError, TransientError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY, AuthRole, AuthSetup, bootstrap
from cloudconnector.model import ObjectRef
from tests.keystore.conftest import Roles, SealableBao, make_token
from tests.keystore.test_vault_auth import AUDIENCE, PROXY_SA, jwt_key, sign_jwt  # noqa: F401 - a fixture
from tests.support.procs import Bao, stop

REPO = Path(__file__).resolve().parents[2]


def connections_to(url: str) -> int:
    """Established TCP connections of this process to the server at ``url``."""
    port = urlsplit(url).port
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            mine.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if int(remote.rsplit(":", 1)[1], 16) == port and state == "01" and f"socket:[{inode}]" in mine:
                count += 1
    return count


def data_path(device: ObjectRef) -> str:
    return f"secret/data/cloud-connector/{device.namespace}/{device.name}"


async def test_fetch_goes_over_one_kept_connection(
    roles: Roles, operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    await operator.put(device, material, {})
    proxy = VaultKeyStore(VaultConfig(address=roles.url, token=roles.proxy_token))
    try:
        before = connections_to(roles.url)
        for _ in range(20):
            assert await proxy.get(device) == material
        assert connections_to(roles.url) == before + 1  # 40 requests, one connection
        assert proxy.session.logins == 1
    finally:
        await proxy.aclose()
    assert connections_to(roles.url) == before


def test_one_store_serves_several_event_loops(roles: Roles, device: ObjectRef, material: KeyMaterial) -> None:
    """aiohttp sessions belong to one loop: the store keeps one per loop, uvloop included (the proxy's)."""
    operator = VaultKeyStore(VaultConfig(address=roles.url, token=roles.operator_token))
    proxy = VaultKeyStore(VaultConfig(address=roles.url, token=roles.proxy_token))
    asyncio.run(operator.put(device, material, {}))
    assert asyncio.run(proxy.get(device)) == material
    assert uvloop.run(proxy.get(device)) == material
    assert proxy.session.logins == 1  # the token outlives the loops
    proxy.close()
    operator.close()


async def test_revoked_login_token_is_replaced_and_renewed(
    roles: Roles,
    jwt_key: rsa.RSAPrivateKey,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    operator: VaultKeyStore,
    device: ObjectRef,
    material: KeyMaterial,
) -> None:
    short = AuthRole("cc-proxy-short", (PROXY_POLICY,), subject=PROXY_SA, audiences=(AUDIENCE,), ttl="3s")
    config = {"jwt_validation_pubkeys": roles.root.read("auth/jwt/config")["data"]["jwt_validation_pubkeys"]}
    await asyncio.to_thread(
        bootstrap, roles.root, auth=[AuthSetup(method="jwt", config=config, roles=(short,))]
    )
    await operator.put(device, material, {})
    (tmp_path / "proxy.jwt").write_text(sign_jwt(jwt_key, PROXY_SA))
    cfg = VaultConfig(
        address=roles.url, auth=AuthMethod.JWT, role="cc-proxy", jwt_file=tmp_path / "proxy.jwt"
    )
    proxy = VaultKeyStore(cfg)
    try:
        assert await proxy.get(device) == material
        assert proxy.session.logins == 1

        roles.root.sys.revoke_prefix("auth/jwt/login")  # every token issued by this auth mount
        assert await proxy.get(device) == material  # the 403 made it log in again
        assert proxy.session.logins == 2
    finally:
        await proxy.aclose()

    renewing = VaultKeyStore(replace(cfg, role="cc-proxy-short"))
    try:
        assert await renewing.get(device) == material
        # Past the renewal point (3/4 of the TTL) but before expiry: only a proactive login counts.
        await asyncio.sleep(2.4)
        assert await renewing.get(device) == material
        assert renewing.session.logins == 2
    finally:
        await renewing.aclose()


async def test_path_outside_the_policy_is_the_permission_error(roles: Roles, proxy: VaultKeyStore) -> None:
    for path in ("secret/data/elsewhere/x", "sys/policies/acl/cloud-connector-proxy"):
        with pytest.raises(PermanentError) as native:
            await proxy.session.read("GET", path)
        with pytest.raises(PermanentError) as threaded:
            await proxy.session.request("GET", path)
        assert native.value.reason == threaded.value.reason == "VaultForbidden"
        assert (
            str(native.value)
            == str(threaded.value)
            == (f"Vault denied GET {path} (HTTP 403): the policy of this role does not allow it")
        )
    assert proxy.session.logins == 5  # each denial re-read the token once before giving up


async def test_sealed_then_stopped_vault_reads_as_before(
    sealable_bao: SealableBao, device: ObjectRef, material: KeyMaterial
) -> None:
    root = hvac.Client(url=sealable_bao.bao.url, token=sealable_bao.bao.token)
    await asyncio.to_thread(bootstrap, root)
    cfg = VaultConfig(address=sealable_bao.bao.url, token=make_token(root, OPERATOR_POLICY), timeout=2)
    await VaultKeyStore(cfg).put(device, material, {})
    proxy = VaultKeyStore(replace(cfg, token=make_token(root, PROXY_POLICY)))
    try:
        assert await proxy.get(device) == material  # a connection is now kept

        async def both() -> tuple[TransientError, TransientError]:
            with pytest.raises(TransientError) as native:
                await proxy.get(device)
            with pytest.raises(TransientError) as threaded:
                await proxy.session.request("GET", data_path(device))
            return native.value, threaded.value

        root.sys.seal()
        native, threaded = await both()
        assert native.reason == threaded.reason == "VaultSealed"
        assert str(native) == str(threaded) == f"Vault cannot serve GET {data_path(device)} now (HTTP 503)"

        root.sys.submit_unseal_key(sealable_bao.unseal_key)
        assert await proxy.get(device) == material

        stop(sealable_bao.bao.proc)
        native, threaded = await both()
        assert native.reason == threaded.reason == "VaultUnavailable"
        assert str(native).startswith(f"Vault unreachable for GET {data_path(device)}: ")
    finally:
        await proxy.aclose()


async def test_tls_read_trusts_only_the_ca_bundle(
    tls_bao: tuple[Bao, Path], tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    server, ca = tls_bao
    root = hvac.Client(url=server.url, token=server.token, verify=str(ca))
    await asyncio.to_thread(bootstrap, root)
    cfg = VaultConfig(address=server.url, token=make_token(root, OPERATOR_POLICY), ca_bundle=ca)
    await VaultKeyStore(cfg).put(device, material, {})
    proxy = VaultKeyStore(replace(cfg, token=make_token(root, PROXY_POLICY)))
    try:
        with pytest.raises(TransientError) as err:
            await VaultKeyStore(replace(cfg, ca_bundle=None)).get(device)
        assert err.value.reason == "VaultTLSFailed"
        missing = VaultKeyStore(replace(cfg, ca_bundle=tmp_path / "not-mounted-yet.pem"))
        with pytest.raises(TransientError) as err:
            await missing.get(device)
        assert err.value.reason == "VaultTLSFailed"
        assert await proxy.get(device) == material
    finally:
        await proxy.aclose()


async def test_no_secret_in_native_errors_or_logs(
    roles: Roles,
    jwt_key: rsa.RSAPrivateKey,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    operator: VaultKeyStore,
    device: ObjectRef,
    material: KeyMaterial,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # aiohttp's own loggers included
    await operator.put(device, material, {})
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged_jwt = sign_jwt(stranger, PROXY_SA)
    (tmp_path / "forged.jwt").write_text(forged_jwt)
    revoked = make_token(roles.root, PROXY_POLICY)
    proxy = VaultKeyStore(VaultConfig(address=roles.url, token=revoked))
    got = await proxy.get(device)
    roles.root.auth.token.revoke(revoked)
    forged = VaultKeyStore(
        VaultConfig(address=roles.url, auth=AuthMethod.JWT, role="cc-proxy", jwt_file=tmp_path / "forged.jwt")
    )
    errors: list[ConnectorError] = []
    for store in (proxy, forged):
        with pytest.raises(PermanentError) as err:
            await store.get(device)
        errors.append(err.value)
    assert [e.reason for e in errors] == ["VaultForbidden", "VaultLoginFailed"]
    await proxy.aclose()
    await forged.aclose()

    secrets = [revoked, forged_jwt, roles.root.token, str(material.password)]
    secrets.append(material.private_key_pem.decode().splitlines()[1])
    texts = [caplog.text, repr(proxy), repr(proxy.session), repr(got)]
    texts += ["".join(traceback.format_exception(e)) for e in errors]
    assert caplog.records
    for text in texts:
        for secret in secrets:
            assert secret not in text
        assert "PRIVATE KEY" not in text


async def test_the_read_path_loads_no_hvac(
    roles: Roles, operator: VaultKeyStore, device: ObjectRef, material: KeyMaterial
) -> None:
    """A process that only reads (the proxy) fetches without importing hvac or requests."""
    await operator.put(device, material, {})
    script = (
        "import asyncio, sys\n"
        "from cloudconnector.keystore.vault import VaultKeyStore\n"
        "from cloudconnector.model import ObjectRef\n"
        "async def main():\n"
        "    store = VaultKeyStore.from_env()\n"
        f"    got = await store.get(ObjectRef({device.namespace!r}, {device.name!r}))\n"
        "    await store.aclose()\n"
        "    print(got.certificate_pem.splitlines()[0], sorted({'hvac', 'requests'} & set(sys.modules)))\n"
        "asyncio.run(main())\n"
    )
    env = {"PATH": os.environ["PATH"], "VAULT_ADDR": roles.url, "VAULT_TOKEN": roles.proxy_token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        cwd=REPO,
        stdout=PIPE,
        stderr=PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().split() == ["-----BEGIN", "CERTIFICATE-----", "[]"]
