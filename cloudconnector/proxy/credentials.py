"""TLS settings shared by both sides of the proxy, the device-facing listener's context, and where
a device's credentials are read from.

The cloud side (one identity per connection) is in ``upstream_tls``.
"""

from __future__ import annotations

import contextlib
import os
import ssl

from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial, KeyReader
from cloudconnector.routes import Route

# TLS 1.2 suites: forward secret (ECDHE) with an AEAD cipher. TLS 1.3 suites are all AEAD already.
UPSTREAM_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!SHA1:!SHA256:!SHA384"
DEVICE_CIPHERS = UPSTREAM_CIPHERS


class CredentialsUnusable(PermanentError):
    """The stored certificate and key cannot be loaded (corrupt, or they do not match)."""

    reason = "CredentialsUnusable"


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


async def read_credentials(keys: KeyReader, route: Route) -> KeyMaterial:
    """The device's credentials, read where the operator recorded them (``status.keyLocation``),
    not where this process's own settings would put them; a status without the field (written
    before it existed) is read from the store's own slot."""
    if route.key_location is None:
        return await keys.get(route.device)
    return await keys.get(route.device, route.key_location)
