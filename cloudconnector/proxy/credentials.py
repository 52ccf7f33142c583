"""Per-device TLS client contexts, built from key material held only in memory.

``ssl.SSLContext.load_cert_chain`` only takes file names, so the PEM goes into an anonymous
memory file (``memfd_create``) opened through ``/proc/self/fd``: nothing touches a disk, and the
file vanishes when its descriptor closes, right after loading. A fresh context per connection, with
session tickets off, means no TLS session can ever be resumed under another device's identity.
"""

from __future__ import annotations

import contextlib
import os
import ssl

from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.routes import Route

# TLS 1.2 suites: forward secret (ECDHE) with an AEAD cipher. TLS 1.3 suites are all AEAD already.
UPSTREAM_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!SHA1:!SHA256:!SHA384"
DEVICE_CIPHERS = UPSTREAM_CIPHERS


class CredentialsUnusable(PermanentError):
    """The stored certificate and key cannot be loaded (corrupt, or they do not match)."""

    reason = "CredentialsUnusable"


def _load_chain_from_memory(ctx: ssl.SSLContext, cert_pem: str, key_pem: bytes) -> None:
    blob = cert_pem.encode() + b"\n" + key_pem
    fd = os.memfd_create("cc-device-credentials", os.MFD_CLOEXEC)
    try:
        view = memoryview(blob)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as e:
        # OpenSSL's text names the failing step, never the key bytes.
        raise CredentialsUnusable(f"device certificate/key rejected: {e.reason or 'unusable'}") from None
    finally:
        os.close(fd)
        del blob, view


def upstream_context(route: Route, material: KeyMaterial, default_ca_file: str | None) -> ssl.SSLContext:
    """A client context for exactly one connection of one device."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(UPSTREAM_CIPHERS)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if route.ca_pem:
        ctx.load_verify_locations(cadata=route.ca_pem)
    elif default_ca_file:
        ctx.load_verify_locations(cafile=default_ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if material.certificate_pem and material.private_key_pem:
        _load_chain_from_memory(ctx, material.certificate_pem, material.private_key_pem)
    return ctx


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The 8883 listener's context: TLS 1.2+, forward-secret AEAD suites only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(DEVICE_CIPHERS)
    # Renegotiation is refused explicitly rather than by the OpenSSL build's default: a device must
    # not be able to re-handshake into different parameters mid-session.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def file_stamp(*paths: str) -> tuple[tuple[int, int, int], ...]:
    """What identifies the current content of files (follows the symlinks Secrets mount)."""
    stamps = []
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)
