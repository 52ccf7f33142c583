"""The 8883 listener's TLS policy as devices meet it: TLS 1.2 and 1.3 with forward-secret AEAD
suites only (the upstream side is tested in tests/proxy/test_tls.py).

Every refused case is first shown to be real: the same client completes a handshake, with
exactly the weakness under test, against a permissive server holding the same kind of
certificate. The proxy then holds an RSA certificate so that RSA key exchange is not ruled out
by the certificate alone. Cases this OpenSSL (3.0) cannot build are left out, not skipped:
3DES and RC4 suites (not in the default provider), SSL 3 (compiled out).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening.conftest import Records
from tests.proxy.conftest import Client, Pki, ProxyThread, World, proxy_config
from tests.support.pki import Issued
from tests.support.procs import wait_for

V = ssl.TLSVersion


@dataclass(frozen=True)
class Offer:
    """What a device client is willing to speak."""

    name: str
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion]
    ciphers: str  # TLS 1.2 and older suites (TLS 1.3 suites are AEAD and forward secret anyway)
    expect: str  # the version or suite the permissive server negotiates with it

    def context(self, pki: Pki) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
        ctx.minimum_version, ctx.maximum_version = self.versions
        # SECLEVEL=0: OpenSSL 3 would otherwise refuse these on the client side itself, and the
        # refusal under test must be the proxy's.
        ctx.set_ciphers(f"{self.ciphers}:@SECLEVEL=0")
        return ctx


TLS12 = (V.TLSv1_2, V.TLSv1_2)
REFUSED = [
    Offer("tls1.0-only", (V.TLSv1, V.TLSv1), "DEFAULT", "TLSv1"),
    Offer("tls1.1-only", (V.TLSv1_1, V.TLSv1_1), "DEFAULT", "TLSv1.1"),
    Offer("rsa-key-exchange-gcm", TLS12, "AES128-GCM-SHA256", "AES128-GCM-SHA256"),
    Offer("rsa-key-exchange-cbc", TLS12, "AES256-SHA256", "AES256-SHA256"),
    Offer("ecdhe-cbc-sha1", TLS12, "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES128-SHA"),
    Offer("ecdhe-cbc-sha384", TLS12, "ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES256-SHA384"),
    Offer("null-encryption", TLS12, "ECDHE-RSA-NULL-SHA", "ECDHE-RSA-NULL-SHA"),
    Offer("anonymous", TLS12, "AECDH-AES128-SHA", "AECDH-AES128-SHA"),
]


class LaxServer:
    """Accepts anything OpenSSL can still negotiate; records what each handshake settled on."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = V.MINIMUM_SUPPORTED
        self.ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with (
                    contextlib.suppress(ssl.SSLError, OSError),
                    conn,
                    self.ctx.wrap_socket(conn, server_side=True) as tls,
                ):
                    tls.recv(1)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Listener:
    proxy: ProxyThread
    lax: LaxServer


def _write(pki: Pki, issued: Issued, d: Path, stem: str) -> tuple[Path, Path]:
    cert, key = issued.write(d, stem)
    return Path(cert), Path(key)


@pytest.fixture
def listener(request: pytest.FixtureRequest, pki: Pki, world: World, tmp_path: Path) -> Iterator[Listener]:
    bits = 2048 if request.param == "rsa" else None  # the certificate kind, from parametrize
    cert, key = _write(
        pki, pki.ca.issue("localhost", hosts=("localhost",), rsa_bits=bits), tmp_path, "listener"
    )
    # A CONNECT timeout far beyond any wait here: a close seen in a test is never the timeout.
    files = {"tls_cert_file": str(cert), "tls_key_file": str(key)}
    pt = ProxyThread(proxy_config(pki, connect_timeout=60.0, **files), world)
    lax = LaxServer(cert, key)
    try:
        yield Listener(pt, lax)
    finally:
        lax.close()
        pt.close()


def handshake(ctx: ssl.SSLContext, port: int, bind: str = "") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(bind, 0))
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def handshake_failures(pt: ProxyThread) -> float:
    value = pt.run(
        lambda: pt.proxy.metrics.registry.get_sample_value(
            "cloudconnector_proxy_connections_total", {"result": "handshake"}
        )
    )
    return float(value or 0.0)


# Every case against an RSA certificate; the version-only ones also against ECDSA (the RSA-signed
# suites cannot be negotiated with an ECDSA certificate at all, so they would prove nothing there).
CASES = [pytest.param(o, "rsa", id=f"{o.name}-rsa") for o in REFUSED] + [
    pytest.param(o, "ecdsa", id=f"{o.name}-ecdsa") for o in REFUSED if o.versions != TLS12
]


@pytest.mark.parametrize(("offer", "listener"), CASES, indirect=["listener"])
def test_weak_device_tls_is_refused(
    listener: Listener, world: World, pki: Pki, offer: Offer, records: Records
) -> None:
    route = world.add()  # a known device: a handshake that got through would be served
    with handshake(offer.context(pki), listener.lax.port) as s:
        negotiated = s.version() if offer.name.startswith("tls1.") else s.cipher()[0]  # type: ignore[index]
    assert negotiated == offer.expect, "the client does not really offer only the weakness under test"

    before = handshake_failures(listener.proxy)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        handshake(offer.context(pki), listener.proxy.tls_port, route.ip or "").close()
    wait_for(lambda: handshake_failures(listener.proxy) == before + 1, what="handshake refusal counted")
    assert records.alarms() == []


@pytest.mark.parametrize("listener", ["rsa", "ecdsa"], indirect=True)
@pytest.mark.parametrize("version", [V.TLSv1_2, V.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_modern_device_tls_is_accepted_and_relayed(
    listener: Listener, world: World, pki: Pki, admin: Client, version: ssl.TLSVersion, records: Records
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    ctx = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    ctx.minimum_version = ctx.maximum_version = version
    # Weak suites offered first: the listener must still choose a forward-secret AEAD one.
    weak = ["AES128-GCM-SHA256", "AES256-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA"]
    strong = ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"]
    ctx.set_ciphers(":".join(weak + strong) + ":@SECLEVEL=0")
    assert {c["name"] for c in ctx.get_ciphers()} >= set(weak)
    dev = Client("modern", bind=route.ip or "", tls=ctx)
    try:
        assert dev.connect(listener.proxy.tls_port, host="localhost") == 0
        sock = dev.c.socket()
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() == {V.TLSv1_2: "TLSv1.2", V.TLSv1_3: "TLSv1.3"}[version]
        suite = str(sock.cipher()[0])  # type: ignore[index]
        if version == V.TLSv1_2:
            assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite
        dev.publish(f"{route.client_id}/up", b"over modern tls", 1)
        got = admin.expect()
        assert (got.topic, got.payload) == (f"{route.client_id}/up", b"over modern tls")
    finally:
        dev.close()
    assert records.alarms() == []


@pytest.mark.parametrize("listener", ["rsa"], indirect=True)
def test_device_renegotiation_is_refused(
    listener: Listener, world: World, pki: Pki, records: Records
) -> None:
    """A TLS 1.2 device asking to renegotiate (a cheap way to make the server do handshake work
    over and over) loses its connection; nothing else is disturbed."""
    route = world.add()
    cli = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-tls1_2",
            "-connect",
            f"127.0.0.1:{listener.proxy.tls_port}",
            "-bind",
            f"{route.ip}:0",
            "-CAfile",
            str(pki.dir / "ca.crt"),
            "-verify_return_error",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert cli.stdin is not None and cli.stdout is not None
    try:
        seen = []
        for line in iter(cli.stdout.readline, b""):
            seen.append(line)
            if line.strip().startswith(b"Verify return code: 0"):
                break
        else:
            raise AssertionError(b"".join(seen).decode(errors="replace"))
        cli.stdin.write(b"R\n")  # s_client's renegotiation command
        cli.stdin.flush()
        # Standard input stays open: only the proxy closing the connection ends the client.
        out = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if select.select([cli.stdout], [], [], 0.2)[0]:
                chunk = os.read(cli.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        else:
            raise AssertionError(f"renegotiation accepted, connection still open: {out!r}")
        assert b"RENEGOTIATING" in out
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.wait()
        cli.stdin.close()
        cli.stdout.close()
    assert records.alarms() == []
