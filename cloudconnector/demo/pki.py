"""Certificates the demo makes at run time: its broker's server certificate and the trust anchors
that let mosquitto accept the certificates moto issues.

moto's CreateKeysAndCertificate returns a certificate whose issuer is the fixed name
"C=US, O=Moto, OU=Server CA 1B, CN=Moto" but which is signed with the *device's own* new key; no
CA certificate exists for it, and every such certificate has the same subject
("CN=AWS IoT Certificate"). A broker can therefore only trust one of them through an anchor
named like moto's issuer and carrying that device's public key, and one listener can hold only
one such anchor (OpenSSL picks an issuer by name, not by key). The demo gives each device its
own listener with its own anchor; that also makes the listener itself the proof of identity.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Pair:
    cert_pem: str
    key_pem: bytes = field(repr=False)


class DemoCA:
    """A throwaway CA for the broker's server certificate and the observer's client certificate."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Cloud Connector demo CA"))
            .issuer_name(_name("Cloud Connector demo CA"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> str:
        return _pem(self._cert)

    def issue(self, cn: str, *, server: bool) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            sans: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Pair(_pem(cert), key_pem)


def trust_anchor(device_cert_pem: str, device_key_pem: bytes) -> str:
    """A self-signed CA certificate that verifies one moto-issued device certificate.

    Named like the certificate's issuer and holding the device's public key, it is exactly the
    CA that would have signed it. It is signed with the device key itself, so it is a genuine
    self-signed root; the key never leaves this function.
    """
    leaf = x509.load_pem_x509_certificate(device_cert_pem.encode())
    key = serialization.load_pem_private_key(device_key_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("unsupported device key type")
    now = dt.datetime.now(dt.UTC)
    anchor = (
        x509.CertificateBuilder()
        .subject_name(leaf.issuer)
        .issuer_name(leaf.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, leaf.not_valid_before_utc) - dt.timedelta(minutes=5))
        .not_valid_after(max(now + dt.timedelta(days=1), leaf.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem(anchor)
