"""``cloud-connector run``: the standalone process — reconciler, state store, key store and proxy.

Everything a cluster would spread over the API server, the operator and the proxy Deployment runs
here in one asyncio loop, sharing one in-memory directory: each reconcile pass publishes the
routes of Ready devices and the proxy picks them up for the next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from cloudconnector.clouds.factory import make_provisioner
from cloudconnector.core.provisioners import ProvisionerPool
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.routes import Route
from cloudconnector.standalone.keys import KeyStores, open_key_stores
from cloudconnector.standalone.runner import DeviceSink, PassResult, Runner, SecretsView
from cloudconnector.standalone.store import StateStore

logger = logging.getLogger(__name__)

RouteTransform = Callable[[Route], Route]


@dataclass
class Standalone:
    """The parts of a running standalone instance, for the CLI and the demo."""

    runner: Runner
    store: StateStore
    keys: KeyStores
    directory: StaticDirectory
    pool: ProvisionerPool


@contextlib.asynccontextmanager
async def standalone(
    manifests: Path,
    state_dir: Path,
    *,
    on_device: DeviceSink | None = None,
    route_transform: RouteTransform | None = None,
    keys: KeyStores | None = None,
    directory: StaticDirectory | None = None,
) -> AsyncIterator[Standalone]:
    """Open the state store, the key store and the provisioner pool; close them on exit.
    ``directory`` receives the routes (e.g. one that forwards them to proxy workers)."""
    store = StateStore(state_dir / "state.db")
    keys = keys or open_key_stores(state_dir)
    secrets = SecretsView()
    pool = ProvisionerPool(make_provisioner, secrets.credentials)
    directory = directory if directory is not None else StaticDirectory()

    def publish(routes: list[Route]) -> None:
        directory.replace([route_transform(r) for r in routes] if route_transform else routes)

    def change(routes: list[Route], removed: list[ObjectRef]) -> None:
        for route in routes:
            directory.put(route_transform(route) if route_transform else route)
        for ref in removed:
            directory.remove(ref)

    runner = Runner(
        manifests,
        store,
        keys.writer,
        pool,
        secrets,
        on_routes=publish,
        on_route_changes=change,
        on_device=on_device,
    )
    try:
        yield Standalone(runner, store, keys, directory, pool)
    finally:
        await pool.aclose()
        closers = keys.closer if isinstance(keys.closer, tuple) else (keys.closer,)
        for closer in dict.fromkeys(c for c in closers if c is not None):
            close = getattr(closer, "close", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        store.close()


def report(result: PassResult) -> str:
    lines = [str(e) for e in result.errors]
    lines += [f"Device {name}: {message}" for name, message in sorted(result.failed.items())]
    if result.pending:
        lines.append(f"{result.pending} device(s) still waiting for a retry")
    return "\n".join(lines)


def ready_devices(store: StateStore) -> list[ObjectRef]:
    return [o.ref for o in store.list("Device") if o.status.get("phase") == "Ready"]
