"""Local stand-ins for AWS IoT Core: moto in server mode (control plane) and mosquitto with mutual
TLS (data plane), started as child processes on loopback ports and always stopped again.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cloudconnector.demo.pki import DemoCA, Pair

MOUNT_PREFIX = "via"  # device listener for thing T republishes every topic under via/T/


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        if _port_open(host, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_moto() -> Iterator[str]:
    """moto's server, as the AWS IoT control plane; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port("127.0.0.1", port, proc, "moto")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@dataclass(frozen=True)
class DeviceListener:
    cloud_id: str
    port: int
    anchor_pem: str  # the trust anchor for this device's moto-issued certificate only


@dataclass(frozen=True)
class Broker:
    host: str
    admin_port: int
    device_ports: Mapping[str, int]  # cloud id -> the listener only that device's certificate opens
    ca_pem: str  # verifies the broker's server certificate
    observer: Pair  # client certificate for the admin listener
    log: Path


def broker_config(
    workdir: Path, ca: DemoCA, server: Pair, admin_port: int, devices: list[DeviceListener]
) -> str:
    """mosquitto.conf: an admin listener for the observer, then one listener per device.

    Every listener demands a client certificate (TLS 1.2+) and takes the certificate's CN as the
    user name. A device listener trusts only that device's anchor and mounts its traffic under
    ``via/<thing>/``, so a message seen there can only have come from that device's certificate.
    """
    (workdir / "ca.pem").write_text(ca.cert_pem)
    (workdir / "server.pem").write_text(server.cert_pem)
    key = workdir / "server.key"
    key.write_bytes(server.key_pem)
    key.chmod(0o600)
    acl = workdir / "acl"
    # The observer reads everything; device identities (all "AWS IoT Certificate" with moto)
    # may only write, and only under their mount point, which mosquitto adds itself.
    acl.write_text("user observer\ntopic read #\n\npattern write #\n")
    lines = [
        # Started as root, mosquitto would switch to its own user and lose access to these files.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "per_listener_settings true",
        "persistence false",
        f"log_dest file {workdir / 'broker.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]

    def listener(port: int, cafile: Path, mount: str | None) -> None:
        lines.extend(
            [
                "",
                f"listener {port} 127.0.0.1",
                f"cafile {cafile}",
                f"certfile {workdir / 'server.pem'}",
                f"keyfile {key}",
                "tls_version tlsv1.2",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                f"acl_file {acl}",
            ]
        )
        if mount:
            lines.append(f"mount_point {mount}")

    listener(admin_port, workdir / "ca.pem", None)
    for dev in devices:
        anchor = workdir / f"anchor-{dev.port}.pem"
        anchor.write_text(dev.anchor_pem)
        listener(dev.port, anchor, f"{MOUNT_PREFIX}/{dev.cloud_id}/")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_broker(workdir: Path, anchors: Mapping[str, str], ca: DemoCA) -> Iterator[Broker]:
    """mosquitto with mutual TLS; ``anchors`` maps each device's cloud id to its trust anchor and
    ``ca`` issues the broker's server certificate (the Endpoint's ``caCertificate``)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    workdir.mkdir(parents=True, exist_ok=True)
    server = ca.issue("localhost", server=True)
    observer = ca.issue("observer", server=False)
    admin_port = free_port()
    devices = [DeviceListener(cid, free_port(), pem) for cid, pem in sorted(anchors.items())]
    conf = workdir / "mosquitto.conf"
    conf.write_text(broker_config(workdir, ca, server, admin_port, devices))
    out = (workdir / "broker.out").open("ab")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=out)
    try:
        _wait_port("127.0.0.1", admin_port, proc, "mosquitto")
        for dev in devices:
            _wait_port("127.0.0.1", dev.port, proc, "mosquitto")
        yield Broker(
            "127.0.0.1",
            admin_port,
            {d.cloud_id: d.port for d in devices},
            ca.cert_pem,
            observer,
            workdir / "broker.log",
        )
    finally:
        _stop(proc)
        out.close()
