"""Operations: health and metrics over HTTP, settings from the environment, JSON logs, drain."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.config import ProxyConfig, from_mapping
from cloudconnector.proxy.health import make_app, start_http
from cloudconnector.proxy.logs import JsonFormatter
from cloudconnector.proxy.server import Proxy
from tests.proxy.conftest import Client, Pki, World, proxy_config


async def test_health_metrics_and_drain(pki: Pki, world: World) -> None:
    route = world.add()
    proxy = Proxy(proxy_config(pki), world.directory, world.keys)
    await proxy.start()
    runner, port = await start_http(make_app(proxy.metrics, lambda: proxy.accepting), "127.0.0.1", 0)
    try:
        dev = Client("d", bind=route.ip or "")
        assert await asyncio.to_thread(dev.connect, proxy.ports["mqtt"]) == 0
        await asyncio.to_thread(dev.subscribe, f"{route.client_id}/t", 1)
        await asyncio.to_thread(dev.publish, f"{route.client_id}/t", b"m", 1)
        await asyncio.to_thread(dev.expect)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.ports["mqtt"], local_addr=("127.0.9.9", 0)
        )
        writer.write(codec.encode(Connect("stranger")))
        assert await reader.read() == b"\x20\x02\x00\x05"
        writer.close()

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert 'cloudconnector_proxy_connections_total{result="ok"} 1.0' in text
        assert 'cloudconnector_proxy_connections_total{result="unknown_device"} 1.0' in text
        assert "cloudconnector_proxy_active_sessions 1.0" in text
        assert "cloudconnector_proxy_upstream_handshake_seconds_count 1.0" in text

        await proxy.stop(drain_seconds=0.1)  # what SIGTERM does
        await asyncio.to_thread(dev.disconnects.get, True, 10)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        # Traffic counters are flushed at least once a second and when a session ends.
        assert 'cloudconnector_proxy_messages_total{direction="device_to_cloud"} 1.0' in text
        assert 'cloudconnector_proxy_messages_total{direction="cloud_to_device"} 1.0' in text
        await asyncio.to_thread(dev.close)
    finally:
        await runner.cleanup()
        await proxy.stop(0)


def test_settings_from_environment() -> None:
    cfg = from_mapping(
        {
            "CC_PROXY_TLS_PORT": "off",
            "CC_PROXY_MQTT_PORT": "11883",
            "CC_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.5",
            "CC_PROXY_IDENTITY": "ip,client_id",
            "CC_PROXY_MAX_CONNECTIONS": "50",
            "CC_PROXY_DEFAULT_CA_FILE": "/etc/ssl/amazon-root-ca-1.pem",
        }
    )
    assert cfg.tls_port is None and cfg.mqtt_port == 11883
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "192.168.1.5/32"]
    assert cfg.identity == ("ip", "client_id") and cfg.max_connections == 50
    assert cfg.default_ca_file == "/etc/ssl/amazon-root-ca-1.pem"
    with pytest.raises(ValueError, match="identity mode"):
        ProxyConfig(tls_port=None, identity=("imei",))
    with pytest.raises(ValueError, match="tls_cert_file"):
        ProxyConfig()


def test_json_logs_carry_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.proxy.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning("device refused: %s", "unknown", extra={"peer": "10.0.0.1", "result": "unknown_device"})
    record = json.loads(out.getvalue())
    assert record["message"] == "device refused: unknown"
    assert record["peer"] == "10.0.0.1" and record["result"] == "unknown_device"
