"""One log format however the proxy runs: the same fields (peer, device, result, reason) in plain
text and JSON lines, ``CC_PROXY_LOG_JSON`` honoured by ``cloud-connector run``, and a reason on
every refusal, an upstream timeout included."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.logs import JsonFormatter, PlainFormatter, describe
from tests.proxy.conftest import Pki, ProxyThread, World, proxy_config, raw_connect, recv_all
from tests.support.procs import free_port, wait_for

FIELDS = {"peer": "10.0.0.7", "device": "fleet/dev1", "result": "upstream_unavailable", "reason": "no answer"}


def formatted(formatter: logging.Formatter) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.proxy.logs.{type(formatter).__name__}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("device refused: %s", "no answer", extra=FIELDS)
    return out.getvalue().strip()


def test_plain_and_json_carry_the_same_fields() -> None:
    record = json.loads(formatted(JsonFormatter()))
    assert {k: record[k] for k in FIELDS} == FIELDS
    plain = formatted(PlainFormatter())
    assert "device refused: no answer" in plain
    for key, value in FIELDS.items():
        expected = f'{key}="{value}"' if " " in value else f"{key}={value}"
        assert expected in plain


def test_reasons_are_never_empty() -> None:
    assert describe(TimeoutError()) == "timed out"
    assert describe(ConnectionResetError()) == "ConnectionResetError"
    assert describe(OSError("refused")) == "refused"


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that completes the handshake (backlog) but never answers the TLS ClientHello."""
    s = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_upstream_timeout_is_refused_with_its_reason(
    pki: Pki, world: World, black_hole: int, caplog: pytest.LogCaptureFixture
) -> None:
    pt = ProxyThread(proxy_config(pki, upstream_timeout=0.5), world)
    try:
        route = world.add()
        pt.run(lambda: world.directory.put(replace(route, port=black_hole)))
        with caplog.at_level(logging.INFO, "cloudconnector.proxy"):
            s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("t")))
            assert recv_all(s) == b"\x20\x02\x00\x03"  # server unavailable
            wait_for(
                lambda: any(r.getMessage().startswith("device refused") for r in caplog.records), what="log"
            )
        refused = [r for r in caplog.records if r.getMessage().startswith("device refused")]
        assert refused[0].getMessage() == "device refused: upstream: no connection within 0.5 s"
        assert refused[0].result == "upstream_unavailable"  # type: ignore[attr-defined]
        assert refused[0].reason and refused[0].peer == route.ip  # type: ignore[attr-defined]
    finally:
        pt.close()


def run_standalone(tmp_path: Path, env: dict[str, str]) -> str:
    """``cloud-connector run`` over an empty site, one CONNECT from an address no device has;
    returns what it logged."""
    (tmp_path / "site").mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(tmp_path / "site")]
    cmd += ["--state", str(tmp_path / "state"), "--bind", "127.0.0.1", "--mqtt-port", str(port)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CC_PROXY_", "VAULT_"))}
    proc = subprocess.Popen(cmd, env={**clean, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def answered() -> bool:
            try:
                s = raw_connect(port, "127.0.9.9", codec.encode(Connect("stranger")))
            except OSError:
                return False
            with s:
                return recv_all(s) == b"\x20\x02\x00\x05"

        wait_for(answered, what="the standalone proxy refusing a stranger")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    return err.decode()


def test_standalone_logs_plain_with_the_fields(tmp_path: Path) -> None:
    err = run_standalone(tmp_path, {})
    line = next(x for x in err.splitlines() if "device refused" in x)
    assert "peer=127.0.9.9" in line and "result=unknown_device" in line and "reason=" in line


def test_standalone_logs_json_when_asked(tmp_path: Path) -> None:
    err = run_standalone(tmp_path, {"CC_PROXY_LOG_JSON": "1"})
    records = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert records and len(records) == len(err.splitlines())  # every line, not only the proxy's
    refused = next(r for r in records if r["message"].startswith("device refused"))
    assert refused["peer"] == "127.0.9.9" and refused["result"] == "unknown_device" and refused["reason"]
