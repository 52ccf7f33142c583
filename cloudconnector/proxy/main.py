"""``cloud-connector-proxy``: run the IoT proxy as a process (a pod in Kubernetes).

Settings come from ``CC_PROXY_*`` environment variables (see :mod:`cloudconnector.proxy.config`),
overridable by arguments; the device directory from the Kubernetes API
(:mod:`cloudconnector.kube.config` settings); device credentials from Vault
(:mod:`cloudconnector.keystore.vault_config` settings) with the proxy's read-only role.
SIGTERM stops accepting, marks the pod not ready and ends sessions spread over the drain time.
With more than one worker (``--workers``, ``CC_PROXY_WORKERS``; default: the cores the pod may
use) this process keeps the watch and the HTTP port and N worker processes relay
(:mod:`cloudconnector.proxy.workers`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cloudconnector.errors import ConnectorError, short
from cloudconnector.proxy.config import ProxyConfig, from_mapping
from cloudconnector.proxy.health import make_app, start_http
from cloudconnector.proxy.logs import JsonFormatter, configure_logging

if TYPE_CHECKING:
    from cloudconnector.proxy.kube_directory import KubeDirectory
    from cloudconnector.proxy.presence import Presence

__all__ = ["JsonFormatter", "configure_logging", "main", "parse_args", "run"]

log = logging.getLogger("cloudconnector.proxy")


def parse_args(argv: Sequence[str] | None) -> tuple[ProxyConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="cloud-connector-proxy", description=__doc__.splitlines()[0])
    p.add_argument("--bind")
    p.add_argument("--mqtt-port", type=int, help="plain MQTT port (0 = off)")
    p.add_argument("--tls-port", type=int, help="MQTT over TLS port (0 = off)")
    p.add_argument("--tls-cert-file")
    p.add_argument("--tls-key-file")
    p.add_argument("--trusted-proxies", help="CIDRs that must send a PROXY protocol header")
    p.add_argument("--identity", help="comma list of ip, client_id, username (tried in order)")
    p.add_argument("--http-port", type=int, help="health and metrics port (0 = off)")
    p.add_argument("--namespace", help="namespaces to serve, comma-separated, globs allowed (default: all)")
    p.add_argument("--workers", help="relaying processes on the same ports (default auto: the usable cores)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    # Arguments override the environment: both end up as CC_PROXY_* settings.
    values = dict(os.environ)
    for name in ("bind", "mqtt_port", "tls_port", "tls_cert_file", "tls_key_file", "trusted_proxies"):
        if getattr(args, name) is not None:
            values[f"CC_PROXY_{name.upper()}"] = str(getattr(args, name))
    for name in ("identity", "http_port", "workers"):
        if getattr(args, name) is not None:
            values[f"CC_PROXY_{name.upper()}"] = str(getattr(args, name))
    return from_mapping(values), args


async def run(cfg: ProxyConfig, namespace: str | None) -> None:
    # Imported here so that --help works without the Kubernetes and Vault settings.
    from cloudconnector.keystore.vault import VaultKeyStore
    from cloudconnector.kube.client import KubeClient
    from cloudconnector.kube.config import KubeConfig
    from cloudconnector.proxy.kube_directory import KubeDirectory
    from cloudconnector.proxy.kube_presence import KubePresenceSink
    from cloudconnector.proxy.presence import Presence
    from cloudconnector.proxy.server import Proxy
    from cloudconnector.proxy.workers import worker_count

    if worker_count(cfg.workers) > 1:
        await run_workers(cfg, namespace, worker_count(cfg.workers))
        return
    kube = KubeClient(KubeConfig.from_env())
    keys = VaultKeyStore.from_env()
    directory = KubeDirectory(kube, namespace)
    presence = None
    if cfg.connection_status:
        name = cfg.pod_name or socket.gethostname()
        sink = KubePresenceSink(kube)
        presence = Presence(sink, name, cfg.status_interval, cfg.status_writes_per_second)
    proxy = Proxy(cfg, directory, keys, presence=presence)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(directory.run())
    background = [watcher]
    if presence is not None:
        background.append(asyncio.create_task(presence.run()))
        background.append(asyncio.create_task(_clear_stale(directory, presence)))
    runner = None
    try:
        if cfg.http_port is not None:
            app = make_app(proxy.metrics, lambda: proxy.accepting and directory.ready)
            runner, _ = await start_http(app, cfg.http_bind, cfg.http_port)
        await proxy.start()
        await stop.wait()
        log.info("draining", extra={"seconds": cfg.drain_seconds})
        await proxy.stop()
        if presence is not None:
            await presence.drain()  # every device this pod served shows disconnected
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await kube.aclose()
        keys.close()


async def run_workers(cfg: ProxyConfig, namespace: str | None, count: int) -> None:
    """The parent of ``count`` workers: the one watch, the HTTP port, supervision (workers.py)."""
    from cloudconnector.kube.client import KubeClient
    from cloudconnector.kube.config import KubeConfig
    from cloudconnector.proxy.kube_directory import KubeDirectory
    from cloudconnector.proxy.kube_presence import KubePresenceSink
    from cloudconnector.proxy.presence import Presence
    from cloudconnector.proxy.workers import PublishingDirectory, WorkerPool

    kube = KubeClient(KubeConfig.from_env())
    directory = KubeDirectory(kube, namespace)
    routes = PublishingDirectory()
    directory._index = routes  # the watch's route index, told to the workers
    name = cfg.pod_name or socket.gethostname()
    sink = KubePresenceSink(kube) if cfg.connection_status else None
    pool = WorkerPool(cfg, count, routes, "vault", sink, name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = [asyncio.create_task(directory.run())]
    if sink is not None:  # the previous run's leftovers, as with one process
        background.append(asyncio.create_task(_clear_stale(directory, Presence(sink, name))))
    runner = None
    try:
        if cfg.http_port is not None:
            app = make_app(pool, lambda: pool.ready and directory.ready)
            runner, _ = await start_http(app, cfg.http_bind, cfg.http_port)
        await pool.start()
        await stop.wait()
        log.info("draining", extra={"seconds": cfg.drain_seconds, "workers": count})
    finally:
        await pool.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await kube.aclose()


async def _clear_stale(directory: KubeDirectory, presence: Presence) -> None:
    """Once the directory has listed: devices shown connected through this pod's name are from a
    previous run of it (a container restarted in its pod) and are not connected now."""
    from cloudconnector.proxy.kube_presence import KubePresenceSink

    await directory.wait_ready()
    assert isinstance(presence.sink, KubePresenceSink)
    try:
        cleared = await presence.sink.clear_stale(presence.proxy, directory.devices())
    except Exception as e:  # the next session of each device corrects it anyway
        log.warning("stale connection status not cleared: %s", short(e, 200))
        return
    if cleared:
        log.info("cleared stale connection status", extra={"devices": cleared})


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cfg, args = parse_args(argv)
    except ValueError as e:
        sys.exit(f"cloud-connector-proxy: {e}")
    from cloudconnector.proxy.openssl_private import self_check

    missing = self_check()  # pyOpenSSL internals the upstream TLS relies on
    if missing is not None:
        sys.exit(f"cloud-connector-proxy: {missing}")
    configure_logging(cfg.log_json, args.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(cfg, args.namespace))
    except ConnectorError as e:  # missing settings, unreachable services at start-up
        log.error("cannot start: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
