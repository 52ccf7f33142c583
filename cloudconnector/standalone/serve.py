"""The body of ``cloud-connector run``: reconcile, then keep the proxy and the file watch going.

The proxy takes the same ``CC_PROXY_*`` settings as the cluster's proxy (TLS listener, PROXY
protocol, identity modes, health and metrics port); the command line overrides the common ones.
Unlike in a cluster, only the plain MQTT listener is on by default, and logs are plain text
unless ``CC_PROXY_LOG_JSON`` is set; either way in the format ``cloud-connector-proxy`` writes
(``proxy/logs.py``), with the same fields. With more than one worker (``--workers``,
``CC_PROXY_WORKERS``; default: the usable cores) this process reconciles and serves HTTP, and
N worker processes relay (:mod:`cloudconnector.proxy.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from cloudconnector.errors import ConnectorError
from cloudconnector.keystore.base import KeyReader
from cloudconnector.proxy.config import ProxyConfig, from_mapping
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.proxy.health import make_app, start_http
from cloudconnector.proxy.logs import configure_logging
from cloudconnector.proxy.presence import Presence
from cloudconnector.proxy.server import Proxy
from cloudconnector.proxy.workers import PublishingDirectory, WorkerPool, worker_count
from cloudconnector.standalone.app import report, standalone
from cloudconnector.standalone.presence import StorePresenceSink
from cloudconnector.standalone.store import StateStore

logger = logging.getLogger(__name__)

PREFIX = "CC_PROXY_"


def proxy_config(env: Mapping[str, str], overrides: Mapping[str, object | None]) -> ProxyConfig:
    """The proxy's settings: standalone defaults, then ``CC_PROXY_*`` from ``env``, then the
    command line's ``overrides`` (field name -> value; None keeps what is there)."""
    values = {f"{PREFIX}TLS_PORT": "0", f"{PREFIX}HTTP_PORT": "0", f"{PREFIX}LOG_JSON": "false"}
    values.update({k: v for k, v in env.items() if k.startswith(PREFIX)})
    values.update({f"{PREFIX}{k.upper()}": str(v) for k, v in overrides.items() if v is not None})
    return from_mapping(values)


@contextlib.asynccontextmanager
async def proxy_server(
    directory: StaticDirectory, keys: KeyReader, config: ProxyConfig, store: StateStore | None = None
) -> AsyncIterator[Proxy]:
    """The proxy routing by ``directory``, with its health and metrics endpoint when configured;
    ``proxy.ports`` holds the bound ports (useful with port 0). With ``store``, each device's live
    connection is kept there for ``cloud-connector status``."""
    presence = None
    if store is not None and config.connection_status:
        name = config.pod_name or socket.gethostname()
        presence = Presence(
            StorePresenceSink(store), name, config.status_interval, config.status_writes_per_second
        )
    proxy = Proxy(config, directory, keys, presence=presence)
    writer = asyncio.create_task(presence.run()) if presence is not None else None
    http = None
    try:
        if config.http_port is not None:
            http, _ = await start_http(
                make_app(proxy.metrics, lambda: proxy.accepting), config.http_bind, config.http_port
            )
        await proxy.start()
        yield proxy
    finally:
        await proxy.stop(0)
        if presence is not None and writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await presence.drain()
        if http is not None:
            await http.cleanup()


def plain_proxy(bind: str, port: int = 0) -> ProxyConfig:
    """Only a plain MQTT listener (the demo's and the tests' proxy)."""
    return ProxyConfig(bind=bind, mqtt_port=port, tls_port=None, http_port=None, log_json=False)


async def run_command(
    manifests: Path,
    state_dir: Path,
    *,
    once: bool,
    interval: float,
    proxy: ProxyConfig | None,
    limit: float,
) -> int:
    if proxy is not None:
        # The whole process logs like the cluster's proxy, at the level the command line chose.
        configure_logging(proxy.log_json, logging.getLogger().getEffectiveLevel())
    serving = proxy is not None and (proxy.mqtt_port is not None or proxy.tls_port is not None)
    workers = worker_count(proxy.workers) if proxy is not None and serving and not once else 1
    directory = PublishingDirectory() if workers > 1 else None
    async with standalone(manifests, state_dir, directory=directory) as sa:
        logger.info("key store: %s; state: %s", sa.keys.kind, state_dir)
        if once:
            try:
                result = await sa.runner.run_until_settled(limit)
            except ConnectorError as e:
                logger.error("%s", e)
                return 2
            text = report(result)
            if text:
                print(text)
            return 1 if (result.errors or result.failed or result.pending) else 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            if proxy is not None and isinstance(directory, PublishingDirectory):
                sink = StorePresenceSink(sa.store)
                name = proxy.pod_name or socket.gethostname()
                # No other replica to spread reconnects to: sessions end at once, as with one process.
                served = dataclasses.replace(proxy, drain_seconds=0.0)
                pool = WorkerPool(served, workers, directory, str(state_dir), sink, name)
                stack.push_async_callback(pool.stop)
                if proxy.http_port is not None:
                    http, _ = await start_http(
                        make_app(pool, lambda: pool.ready), proxy.http_bind, proxy.http_port
                    )
                    stack.push_async_callback(http.cleanup)
                await pool.start()
            elif proxy is not None and serving:
                server = await stack.enter_async_context(
                    proxy_server(sa.directory, sa.keys.reader, proxy, sa.store)
                )
                logger.info("proxy listening on %s", proxy.bind, extra={"ports": dict(server.ports)})
            watcher = asyncio.create_task(sa.runner.watch(interval))
            await stop.wait()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return 0
