"""The body of ``cloud-connector run``: reconcile, then keep the proxy and the file watch going."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from cloudconnector.errors import ConnectorError
from cloudconnector.keystore.base import KeyReader
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.proxy.server import Proxy
from cloudconnector.standalone.app import report, standalone

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def proxy_server(
    directory: StaticDirectory, keys: KeyReader, *, bind: str, mqtt_port: int
) -> AsyncIterator[Proxy]:
    """The proxy's plain MQTT listener on ``bind``:``mqtt_port`` (0: any free port), routing by
    ``directory``; ``proxy.ports["mqtt"]`` is the bound port."""
    config = ProxyConfig(bind=bind, mqtt_port=mqtt_port, tls_port=None, http_port=None, log_json=False)
    proxy = Proxy(config, directory, keys)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop(0)


async def run_command(
    manifests: Path,
    state_dir: Path,
    *,
    once: bool,
    interval: float,
    bind: str,
    mqtt_port: int | None,
    limit: float,
) -> int:
    async with standalone(manifests, state_dir) as sa:
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
            if mqtt_port is not None:
                proxy = await stack.enter_async_context(
                    proxy_server(sa.directory, sa.keys.reader, bind=bind, mqtt_port=mqtt_port)
                )
                logger.info("proxy: plain MQTT on %s:%s", bind, proxy.ports["mqtt"])
            watcher = asyncio.create_task(sa.runner.watch(interval))
            await stop.wait()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    return 0
