"""Logging in to Vault: JWT (service-account shaped) login, re-login after revocation, token files."""

from __future__ import annotations

import asyncio
import json
import time
from base64 import urlsafe_b64encode
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cloudconnector.errors import InvalidSpec, PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore, transit_key_name
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY, AuthRole, AuthSetup, bootstrap
from cloudconnector.model import ObjectRef
from tests.keystore.conftest import Roles, make_token
from tests.support.pki import CA

AUDIENCE = "vault"
OPERATOR_SA = "system:serviceaccount:cloud-connector:cloud-connector-operator"
PROXY_SA = "system:serviceaccount:cloud-connector:cloud-connector-proxy"
SA_UID = "0f6b1c2e-0000-4000-8000-000000000001"


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(key: rsa.RSAPrivateKey, subject: str, audience: str = AUDIENCE, ttl: int = 600) -> str:
    """A Kubernetes service-account token shape, signed RS256 by a key of this test."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": "test"}
    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": subject,
        "aud": [audience],
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl,
        "kubernetes.io": {
            "namespace": subject.split(":")[2],
            "serviceaccount": {"name": subject.rsplit(":", 1)[1], "uid": SA_UID},
        },
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def jwt_key(roles: Roles) -> rsa.RSAPrivateKey:
    """A signing key trusted by ``auth/jwt``, with operator and proxy roles bound to their subjects."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    setup = AuthSetup(
        method="jwt",
        config={"jwt_validation_pubkeys": [public.decode()]},
        roles=(
            AuthRole(
                "cc-operator", (OPERATOR_POLICY,), subject=OPERATOR_SA, audiences=(AUDIENCE,), ttl="10m"
            ),
            AuthRole("cc-proxy", (PROXY_POLICY,), subject=PROXY_SA, audiences=(AUDIENCE,), ttl="10m"),
        ),
    )
    bootstrap(roles.root, auth=[setup])
    return key


def jwt_store(roles: Roles, path: Path, role: str) -> VaultKeyStore:
    return VaultKeyStore(VaultConfig(address=roles.url, auth=AuthMethod.JWT, role=role, jwt_file=path))


async def test_jwt_login_gives_each_component_its_role(
    roles: Roles, jwt_key: rsa.RSAPrivateKey, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    (tmp_path / "operator.jwt").write_text(sign_jwt(jwt_key, OPERATOR_SA))
    (tmp_path / "proxy.jwt").write_text(sign_jwt(jwt_key, PROXY_SA))
    operator = jwt_store(roles, tmp_path / "operator.jwt", "cc-operator")
    proxy = jwt_store(roles, tmp_path / "proxy.jwt", "cc-proxy")

    await operator.put(device, material, {"via": "jwt"})
    assert await proxy.get(device) == material
    with pytest.raises(PermanentError) as err:
        await operator.get(device)
    assert err.value.reason == "VaultForbidden"
    assert operator.session.logins == 2  # the 403 made it log in once more before giving up


async def test_jwt_of_another_subject_is_refused(
    roles: Roles, jwt_key: rsa.RSAPrivateKey, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    (tmp_path / "intruder.jwt").write_text(sign_jwt(jwt_key, "system:serviceaccount:default:intruder"))
    store = jwt_store(roles, tmp_path / "intruder.jwt", "cc-operator")
    with pytest.raises(PermanentError) as err:
        await store.put(device, material, {})
    assert err.value.reason == "VaultLoginFailed"
    assert "auth/jwt/login" in str(err.value)


async def test_jwt_signed_by_an_unknown_key_is_refused(
    roles: Roles, jwt_key: rsa.RSAPrivateKey, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "forged.jwt").write_text(sign_jwt(stranger, OPERATOR_SA))
    store = jwt_store(roles, tmp_path / "forged.jwt", "cc-operator")
    with pytest.raises(PermanentError) as err:
        await store.describe(device)
    assert err.value.reason == "VaultLoginFailed"


async def test_revoked_login_token_is_replaced_by_a_new_login(
    roles: Roles, jwt_key: rsa.RSAPrivateKey, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    (tmp_path / "operator.jwt").write_text(sign_jwt(jwt_key, OPERATOR_SA))
    operator = jwt_store(roles, tmp_path / "operator.jwt", "cc-operator")
    await operator.put(device, material, {"n": "1"})
    assert operator.session.logins == 1

    roles.root.sys.revoke_prefix("auth/jwt/login")  # every token issued by this auth mount
    info = await operator.put(device, material, {"n": "2"})
    assert info.version == 2
    assert operator.session.logins == 2


async def test_revoked_static_token_is_a_permanent_error(
    roles: Roles, device: ObjectRef, material: KeyMaterial
) -> None:
    token = make_token(roles.root, OPERATOR_POLICY)
    store = VaultKeyStore(VaultConfig(address=roles.url, token=token))
    await store.put(device, material, {})
    roles.root.auth.token.revoke(token)
    with pytest.raises(PermanentError) as err:
        await store.put(device, material, {})
    assert err.value.reason == "VaultForbidden"
    assert token not in str(err.value)


async def test_token_file_is_read_again_after_a_403(
    roles: Roles, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    token_file = tmp_path / "token"
    old = make_token(roles.root, OPERATOR_POLICY)
    token_file.write_text(old + "\n")
    store = VaultKeyStore(VaultConfig(address=roles.url, token_file=token_file))
    await store.put(device, material, {})

    roles.root.auth.token.revoke(old)
    token_file.write_text(make_token(roles.root, OPERATOR_POLICY))  # what an agent sink does
    assert (await store.put(device, material, {})).version == 2


async def test_login_token_is_renewed_before_it_expires(
    roles: Roles, jwt_key: rsa.RSAPrivateKey, tmp_path: Path, device: ObjectRef, material: KeyMaterial
) -> None:
    short_role = AuthRole(
        "cc-short", (OPERATOR_POLICY,), subject=OPERATOR_SA, audiences=(AUDIENCE,), ttl="3s"
    )
    bootstrap(roles.root, auth=[AuthSetup(method="jwt", config=_jwt_config(roles), roles=(short_role,))])
    (tmp_path / "operator.jwt").write_text(sign_jwt(jwt_key, OPERATOR_SA))
    store = jwt_store(roles, tmp_path / "operator.jwt", "cc-short")
    await store.put(device, material, {})
    first = store.session.logins
    # Past the renewal point (3/4 of the TTL) but before expiry: only a proactive login counts here.
    await asyncio.sleep(2.4)
    await store.put(device, material, {})
    assert store.session.logins == first + 1


def _jwt_config(roles: Roles) -> dict[str, object]:
    current = roles.root.read("auth/jwt/config")["data"]
    return {"jwt_validation_pubkeys": current["jwt_validation_pubkeys"]}


def test_device_names_stay_unique_as_transit_keys() -> None:
    # With a plain dash separator these two slots would share a key.
    assert transit_key_name(ObjectRef("a-b", "c")) != transit_key_name(ObjectRef("a", "b-c"))
    with pytest.raises(InvalidSpec):
        transit_key_name(ObjectRef("a.b", "c"))
    with pytest.raises(InvalidSpec):
        transit_key_name(ObjectRef("ns", "../etc"))


async def test_kubernetes_login_is_checked_by_a_token_review(
    kmock: Any,
    roles: Roles,
    jwt_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    device: ObjectRef,
    material: KeyMaterial,
) -> None:
    """auth/kubernetes asks the API server (here kmock, over HTTP) whether the pod's JWT is genuine."""
    genuine = sign_jwt(jwt_key, OPERATOR_SA)
    reviewed: list[str] = []

    def token_review(request: Any) -> dict[str, Any]:
        token = request.data["spec"]["token"]
        reviewed.append(token)
        ok = token == genuine
        user = {"username": OPERATOR_SA, "uid": SA_UID} if ok else {}
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": ok, "user": user, "audiences": [AUDIENCE]},
        }

    kmock["post /apis/authentication.k8s.io/v1/tokenreviews"] << token_review
    role = AuthRole(
        "cc-operator",
        (OPERATOR_POLICY,),
        service_accounts=("cloud-connector-operator",),
        namespaces=("cloud-connector",),
    )
    config = {
        "kubernetes_host": str(kmock.url).rstrip("/"),
        "kubernetes_ca_cert": CA("unused for plain HTTP").cert_pem,
        "disable_local_ca_jwt": True,  # review each login with the caller's own JWT
    }
    await asyncio.to_thread(
        bootstrap, roles.root, auth=[AuthSetup("kubernetes", config, (role,), "k8s-test")]
    )

    (tmp_path / "sa.jwt").write_text(genuine)
    cfg = VaultConfig(
        address=roles.url,
        auth=AuthMethod.KUBERNETES,
        role="cc-operator",
        auth_mount="k8s-test",
        jwt_file=tmp_path / "sa.jwt",
    )
    store = VaultKeyStore(cfg)
    await store.put(device, material, {"via": "kubernetes"})
    assert reviewed == [genuine]

    # A token the API server does not vouch for (here: an unknown key's signature) is refused.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "forged.jwt").write_text(sign_jwt(stranger, OPERATOR_SA))
    forged = VaultKeyStore(replace(cfg, jwt_file=tmp_path / "forged.jwt"))
    with pytest.raises(PermanentError) as err:
        await forged.describe(device)
    assert err.value.reason == "VaultLoginFailed"
