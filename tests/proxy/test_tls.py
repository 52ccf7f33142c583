"""TLS on both sides: the 8883 listener's policy and certificate reload, upstream verification."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from tests.proxy.conftest import Pki, ProxyThread, World, proxy_config, raw_connect, recv_all
from tests.support.pki import CA
from tests.support.procs import Mosquitto, wait_for
from tests.support.tlsserver import LocalServer


def tls_client(pki: Pki, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    for name, value in versions.items():
        setattr(ctx, name, value)
    return ctx


def test_listener_refuses_old_tls(world: World, proxy: ProxyThread, pki: Pki) -> None:
    ctx = tls_client(pki, maximum_version=ssl.TLSVersion.TLSv1_1)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    # OpenSSL 3 refuses TLS 1.1 on the client side at its default security level; lowered here
    # so that the refusal observed is the proxy's.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    raw = socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        ctx.wrap_socket(raw, server_hostname="localhost").close()


def test_listener_tls12_and_13(world: World, proxy: ProxyThread, pki: Pki) -> None:
    route = world.add()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = tls_client(pki, minimum_version=version, maximum_version=version)
        raw = socket.create_connection(
            ("127.0.0.1", proxy.tls_port), timeout=10, source_address=(route.ip or "", 0)
        )
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert (
                s.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
            )
            s.sendall(codec.encode(Connect("x")))
            assert s.recv(4) == b"\x20\x02\x00\x00"


def test_listener_certificate_reloaded(pki: Pki, world: World, tmp_path: Path) -> None:
    d = tmp_path
    first = pki.ca.issue("first.proxy", hosts=("localhost",))
    cert, key = first.write(d, "listener")
    pt = ProxyThread(
        proxy_config(pki, tls_cert_file=str(cert), tls_key_file=str(key), tls_reload_seconds=0.1), world
    )
    try:
        # From a device's address: in IP mode any other is refused before the handshake.
        source = (world.add().ip or "", 0)

        def served_cn() -> str:
            ctx = tls_client(pki)
            raw = socket.create_connection(("127.0.0.1", pt.tls_port), timeout=10, source_address=source)
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                subject = dict(x[0] for x in s.getpeercert()["subject"])  # type: ignore[index]
                return str(subject["commonName"])

        assert served_cn() == "first.proxy"
        second = pki.ca.issue("second.proxy", hosts=("localhost",))
        # Like a mounted Secret: new files swapped in, not edited in place.
        c2, k2 = second.write(d, "listener-new")
        shutil.move(str(k2), str(key))
        shutil.move(str(c2), str(cert))
        wait_for(lambda: served_cn() == "second.proxy", what="reloaded listener certificate")
    finally:
        pt.close()


def test_upstream_with_untrusted_certificate_is_unavailable(world: World, proxy: ProxyThread) -> None:
    route = world.add()
    other_ca = CA("Some Other CA")
    proxy.run(lambda: world.directory.put(replace(route, ca_pem=other_ca.cert_pem)))
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert recv_all(s) == b"\x20\x02\x00\x03"


def test_mosquitto_clients_as_devices(world: World, proxy: ProxyThread, broker: Mosquitto, pki: Pki) -> None:
    route = world.add()
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "localhost",
            "-p",
            str(broker.port),
            "--cafile",
            str(pki.dir / "ca.crt"),
            "--cert",
            pki.client_files(pki.admin, "admin-cli")[0],
            "--key",
            str(pki.dir / "admin-cli.key"),
            "-t",
            f"{route.client_id}/cli",
            "-C",
            "1",
            "-W",
            "20",
            "-q",
            "1",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        # Publish until the subscriber (connecting on its own) has heard one message.
        deadline = time.monotonic() + 20
        while sub.poll() is None and time.monotonic() < deadline:
            subprocess.run(
                [
                    "mosquitto_pub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(proxy.port),
                    "-A",
                    route.ip or "",
                    "-t",
                    f"{route.client_id}/cli",
                    "-m",
                    "from mosquitto_pub",
                    "-q",
                    "1",
                    "-i",
                    "cli",
                ],
                check=True,
                timeout=10,
            )
            try:
                out, _ = sub.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out = b""
        assert out.strip() == b"from mosquitto_pub"
    finally:
        sub.kill()
        sub.wait()


class WeakServer(LocalServer):
    """A TLS server that offers only what the proxy must refuse (old versions or weak suites)."""

    def __init__(self, pki: Pki, ctx_setup: Callable[[ssl.SSLContext], None], rsa: bool = False) -> None:
        issued = pki.ca.issue("localhost", hosts=("localhost",), rsa_bits=2048 if rsa else None)
        cert, key = pki.client_files(issued, f"weak-{id(self)}")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        ctx_setup(self.ctx)
        self.handshakes: list[str] = []
        self.start()

    def handle(self, raw: socket.socket) -> None:
        tls = self.ctx.wrap_socket(raw, server_side=True)
        self.handshakes.append(str(tls.version()))
        tls.recv(1)  # until the client goes
        tls.close()


def tls11_only(ctx: ssl.SSLContext) -> None:
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1


def weak_suites_only(ctx: ssl.SSLContext) -> None:
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA:AES256-SHA:AES128-GCM-SHA256")  # no forward secrecy


@pytest.mark.parametrize(("setup", "rsa"), [(tls11_only, False), (weak_suites_only, True)])
def test_upstream_offering_weak_tls_is_refused(
    world: World, proxy: ProxyThread, pki: Pki, setup: Callable[[ssl.SSLContext], None], rsa: bool
) -> None:
    server = WeakServer(pki, setup, rsa)
    try:
        # A permissive client gets through: the server really offers only the weak options.
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        lax.check_hostname, lax.verify_mode = False, ssl.CERT_NONE
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.set_ciphers("ALL:@SECLEVEL=0")
        with lax.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10)):
            pass
        wait_for(lambda: len(server.handshakes) == 1, what="permissive handshake")
        route = world.add(port=server.port)
        s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
        assert recv_all(s) == b"\x20\x02\x00\x03"
        assert len(server.handshakes) == 1  # the proxy never completed one
    finally:
        server.close()
