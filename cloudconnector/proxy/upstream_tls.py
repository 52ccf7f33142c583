"""Mutual TLS to the cloud: a shared, stateless context per trust bundle, one identity per connection.

Python's ``ssl`` binds a client certificate to an ``SSLContext``, which forced one context per
device connection (≈ 22 KiB resident and ≈ 0.5 ms to build and load the CA, docs/benchmarks.md).
OpenSSL itself binds the certificate and key to the connection (``SSL_use_certificate`` and
``SSL_use_PrivateKey``, pyOpenSSL's ``Connection.use_*``). So a context here holds only settings
and trust anchors, with the session cache off and no tickets: it has no TLS state to share, and each
connection carries exactly one device's certificate and key, parsed from memory (never a file).

``TLSLink`` runs OpenSSL over memory BIOs on a plain asyncio transport and presents itself as a
transport, so the session code keeps its ``StreamReader``/``StreamWriter`` pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.proxy import openssl_private as private
from cloudconnector.proxy.credentials import UPSTREAM_CIPHERS, CredentialsUnusable
from cloudconnector.proxy.resolver import Resolver, literal_ip
from cloudconnector.routes import Route

# All TLS 1.3 suites that are AEAD with a 128/256-bit key; CCM suites are left out like Python's default.
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
# Key exchange groups, most preferred first. The hybrid post-quantum group is offered, but a key
# share is sent only for X25519 ("*"): a server that supports ML-KEM asks for it (one more round
# trip), every other server costs no ML-KEM key generation (0.2 ms per connection, measured).
GROUPS = b"X25519MLKEM768:*X25519:P-256:P-384"
CLASSIC_GROUPS = b"X25519:P-256:P-384"  # an OpenSSL without ML-KEM or key-share markers
RECORD = 16 * 1024  # one SSL_read never returns more than one record's plaintext
FLUSH = 64 * 1024
CONTEXTS_KEPT = 64  # trust bundles are per Endpoint: a handful in practice
_REJECTED = "device certificate/key rejected"


class UpstreamTLSError(ConnectionError):
    """The TLS layer to the cloud failed; the text is OpenSSL's reason, never key material."""


def _describe(error: SSL.Error) -> str:
    detail = error.args[0] if error.args else None
    if isinstance(detail, list):  # OpenSSL's error queue: (library, function, reason) per entry
        reasons = [str(entry[-1]) for entry in detail if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


class ContextCache:
    """Client contexts by what they contain: trust anchors and, rarely, a device chain's intermediates.

    Neither is secret, and the session cache is off, so sharing a context shares no TLS state.
    """

    def __init__(self, default_ca_file: str | None) -> None:
        self._default_ca_file = default_ca_file
        self._contexts: OrderedDict[tuple[str | None, tuple[bytes, ...]], SSL.Context] = OrderedDict()

    def get(self, ca_pem: str | None, intermediates: tuple[x509.Certificate, ...] = ()) -> SSL.Context:
        key = (ca_pem, tuple(c.tbs_certificate_bytes for c in intermediates))
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._build(ca_pem, intermediates)
            self._contexts[key] = ctx
            if len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(key)
        return ctx

    def _build(self, ca_pem: str | None, intermediates: tuple[x509.Certificate, ...]) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(UPSTREAM_CIPHERS.encode())
        ctx.set_tls13_ciphersuites(TLS13_SUITES.encode())
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no record buffers
        ctx.set_verify(SSL.VERIFY_PEER)
        if not private.set_groups(ctx, GROUPS) and not private.set_groups(ctx, CLASSIC_GROUPS):
            raise ValueError("OpenSSL accepts none of the key exchange groups")
        if ca_pem:
            store = ctx.get_cert_store()
            assert store is not None
            try:
                anchors = x509.load_pem_x509_certificates(ca_pem.encode())
            except ValueError:
                raise ValueError("the endpoint's CA bundle holds no readable certificate") from None
            for anchor in anchors:
                store.add_cert(crypto.X509.from_cryptography(anchor))  # the store takes no other type
        elif self._default_ca_file:
            ctx.load_verify_locations(self._default_ca_file)
        else:
            paths = ssl.get_default_verify_paths()  # the system trust store, as Python's ssl finds it
            if paths.cafile or paths.capath:
                ctx.load_verify_locations(paths.cafile, paths.capath)
            else:
                ctx.set_default_verify_paths()
        for cert in intermediates:
            ctx.add_extra_chain_cert(cert)
        return ctx


def _device_identity(material: KeyMaterial) -> tuple[list[x509.Certificate], PrivateKeyTypes] | None:
    if not (material.certificate_pem and material.private_key_pem):
        return None
    try:
        chain = x509.load_pem_x509_certificates(material.certificate_pem.encode())
        # The key comes from the connector's own key store, written only after it was made or
        # checked: RSA validation (a primality test, ≈ 27 ms) is skipped like for any trusted key.
        key = load_pem_private_key(material.private_key_pem, None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError):
        raise CredentialsUnusable(f"{_REJECTED}: not a readable PEM certificate and key") from None
    return chain, key


def device_connection(contexts: ContextCache, route: Route, material: KeyMaterial) -> SSL.Connection:
    """An OpenSSL connection for exactly one device: its certificate, its key, the endpoint's name."""
    identity = _device_identity(material)
    chain: list[x509.Certificate] = identity[0] if identity else []
    conn = SSL.Connection(contexts.get(route.ca_pem, tuple(chain[1:])), None)
    if identity is not None:
        try:
            conn.use_certificate(chain[0])
            conn.use_privatekey(identity[1])  # OpenSSL checks that the key matches the certificate
        except SSL.Error:
            raise CredentialsUnusable(f"{_REJECTED}: the key does not match the certificate") from None
    _expect_peer(conn, route.host)
    return conn


def _expect_peer(conn: SSL.Connection, host: str) -> None:
    """Verify the server's name during the handshake (before the device's certificate is sent)."""
    ip = literal_ip(host)
    if ip is not None:
        ok = private.expect_peer_ip(conn, ip.packed)
    else:
        name = host.encode("idna")
        ok = private.expect_peer_name(conn, name)
        conn.set_tlsext_host_name(name)  # SNI is for names only, never an address
    if not ok:
        raise ValueError(f"cannot verify the endpoint as {host!r}")


def _has_more(conn: SSL.Connection) -> bool:
    """Whether a ``recv`` could return more: decrypted bytes, or encrypted ones still in the BIO.

    Asking avoids an exception per read (about 1 µs each, measured) on the hot path; without
    pyOpenSSL's memory-BIO attribute it answers "maybe" and the exception ends the loop.
    """
    return private.has_more(conn)


def _has_output(conn: SSL.Connection) -> bool:
    return private.has_output(conn)


_spent: SSL.Context | None = None


def _spent_context() -> SSL.Context:
    """An empty context to move established connections to, which drops their certificate and key.

    ``SSL_set_SSL_CTX`` replaces the connection's certificate slot with the new context's (none).
    Once the handshake is done the key has no further use: renegotiation is off and TLS 1.3
    post-handshake authentication is never offered, so nothing could ask the proxy to sign again.
    """
    global _spent
    if _spent is None:
        _spent = SSL.Context(SSL.TLS_CLIENT_METHOD)
    return _spent


class TLSLink(asyncio.Protocol, asyncio.Transport):
    """The protocol of the TCP connection below and the transport of the stream protocol above."""

    def __init__(self, conn: SSL.Connection, app: asyncio.Protocol, handshake: asyncio.Future[None]) -> None:
        asyncio.Transport.__init__(self)
        self._conn: SSL.Connection | None = conn
        self._app = app
        self._handshake = handshake
        self._raw: asyncio.Transport | None = None
        self._open = False  # handshake done, the app protocol is connected
        self._closing = False
        self.wire_bytes = 0  # TLS bytes both ways, handshake included (presence.py: TLS saved)

    # -- the TCP side ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self._conn is not None
        self._raw = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._conn.set_connect_state()
        self._advance_handshake()

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        self.wire_bytes += len(data)
        conn.bio_write(data)
        if not self._open:
            self._advance_handshake()
            if not self._open:
                return
        chunks = []
        while True:
            try:
                chunks.append(conn.recv(RECORD))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the cloud sent close_notify
                self._deliver(chunks)
                if self._open:
                    self._app.eof_received()
                self._abandon()
                return
            except SSL.Error as e:
                self._deliver(chunks)
                self._fail(e)
                return
            if not _has_more(conn):
                break
        self._deliver(chunks)
        if _has_output(conn):  # reading may have produced records to send (a TLS 1.3 KeyUpdate answer)
            self._flush()

    def _deliver(self, chunks: list[bytes]) -> None:
        # Several records of one TCP read go up as one chunk: one write, one send, on the other side.
        if chunks and self._open:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def eof_received(self) -> bool:
        if self._open:
            self._app.eof_received()
        return False  # close the TCP connection; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._conn = None  # drops the device's key with the connection
        if self._open:
            self._open = False
            self._app.connection_lost(exc)
        elif not self._handshake.done():
            why = f"connection closed during TLS handshake: {exc or 'EOF'}"
            self._handshake.set_exception(UpstreamTLSError(why))

    def pause_writing(self) -> None:
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._app.resume_writing()

    def _advance_handshake(self) -> None:
        assert self._conn is not None
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as e:
            self._flush()  # let the server see our alert
            self._fail(e)
            return
        self._flush()
        self._conn.set_context(_spent_context())  # the device's key leaves memory here
        self._open = True
        self._app.connection_made(self)
        if not self._handshake.done():
            self._handshake.set_result(None)

    def _flush(self) -> None:
        conn, raw = self._conn, self._raw
        if conn is None or raw is None:
            return
        while True:
            try:
                out = conn.bio_read(FLUSH)
            except SSL.WantReadError:
                return
            self.wire_bytes += len(out)
            raw.write(out)
            if len(out) < FLUSH:  # a memory BIO hands over all it has, up to the size asked
                return

    def _fail(self, error: SSL.Error) -> None:
        exc = UpstreamTLSError(_describe(error))
        if not self._open and not self._handshake.done():
            self._handshake.set_exception(exc)
        elif self._open:
            self._open = False
            self._app.connection_lost(exc)
        self._abandon()

    def _abandon(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # -- the transport the stream protocol sees ----------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        if conn is None or self._closing:
            return
        try:
            conn.sendall(data)
        except SSL.Error as e:
            self._fail(e)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._conn is not None and self._open:
            with contextlib.suppress(SSL.Error):
                self._conn.shutdown()  # queues close_notify; the peer's answer is not awaited
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._abandon()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw is not None and self._raw.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._conn
        if name == "sslcontext":  # tells StreamReaderProtocol that half-close is not possible
            return self._conn.get_context() if self._conn is not None else default
        return self._raw.get_extra_info(name, default) if self._raw is not None else default


async def open_tls(
    host: str, port: int, conn: SSL.Connection, resolver: Resolver | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and complete the handshake, verified against the context's anchors and ``host``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    app = asyncio.StreamReaderProtocol(reader, loop=loop)
    handshake: asyncio.Future[None] = loop.create_future()
    link = TLSLink(conn, app, handshake)
    resolver = resolver or Resolver(ttl=0)
    try:
        addresses = await resolver.addresses(host, port)
        for i, (family, sockaddr) in enumerate(addresses):
            try:
                await loop.create_connection(lambda: link, sockaddr[0], sockaddr[1], family=family)
                break
            except OSError:
                if i == len(addresses) - 1:
                    raise
        await handshake
    except OSError:
        resolver.forget(host, port)  # the next attempt asks DNS again
        link.abort()
        raise
    except BaseException:
        link.abort()
        raise
    return reader, asyncio.StreamWriter(link, app, reader, loop)
