"""X.509 helpers shared by every provisioner: fingerprints, validation and self-signed issuance.

Error messages name what is wrong with the material, never the material itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from cloudconnector.errors import PermanentError

MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class CertInfo:
    sha256: str  # hex, lower case, no colons
    sha1: str
    not_after: dt.datetime
    subject_cn: str | None


def load_cert(cert_pem: str | bytes) -> x509.Certificate:
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PermanentError(
            "the certificate is not a valid PEM X.509 certificate", reason="BadCertificate"
        ) from None


def cert_info(cert_pem: str | bytes) -> CertInfo:
    cert = load_cert(cert_pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertInfo(
        sha256=hashlib.sha256(der).hexdigest(),
        sha1=hashlib.sha1(der, usedforsecurity=False).hexdigest(),
        not_after=cert.not_valid_after_utc,
        subject_cn=str(cns[0].value) if cns else None,
    )


def validate_material(cert_pem: str | bytes, key_pem: bytes) -> CertInfo:
    """Check user-supplied credentials: parseable, the key matches, RSA >= 2048 or EC P-256, in date."""
    cert = load_cert(cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise PermanentError(
            "the private key is not an unencrypted PEM private key", reason="BadPrivateKey"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise PermanentError(
                f"RSA key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})", reason="WeakKey"
            )
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise PermanentError(f"EC curve {key.curve.name} is not supported (use P-256)", reason="WeakKey")
    else:
        raise PermanentError("only RSA and EC P-256 keys are supported", reason="WeakKey")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PermanentError("the private key does not match the certificate", reason="KeyMismatch")
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise PermanentError("the certificate has expired", reason="CertificateExpired")
    return cert_info(cert_pem)


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def self_signed(common_name: str, days: int = 365) -> tuple[str, bytes]:
    """A fresh RSA-2048 key and a self-signed client certificate for it, as (cert PEM, key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clock skew at the cloud
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def verify_self_signed(cert_pem: str | bytes) -> bool:
    """True when the certificate's signature verifies with its own public key (RSA or EC)."""
    cert = load_cert(cert_pem)
    pub = cert.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            pub.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
            )
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return True
