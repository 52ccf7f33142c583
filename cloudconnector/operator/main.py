"""Entry point: ``cloud-connector-operator`` / ``python -m cloudconnector.operator.main``.

Wires kopf to the cluster (``kopf.on.login``), to Vault (``VaultKeyStore`` from its environment
variables) and to the clouds (``clouds.factory.make_provisioner``), then runs the handlers of
:mod:`cloudconnector.operator.handlers`. kopf keeps its own bookkeeping in annotations under
``kopf.cloudconnector.io`` so that ``status`` holds only the fields the CRDs document.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from typing import Any

import kopf

from cloudconnector import api
from cloudconnector.kube import KubeClient, KubeConfig
from cloudconnector.kube.client import KubeError
from cloudconnector.kube.config import kopf_connection_info
from cloudconnector.operator import handlers, indexes, logs, preflight, protection
from cloudconnector.operator.config import OFF, OperatorConfig
from cloudconnector.operator.runtime import Runtime, SecretAccess, build_pool

logger = logging.getLogger("cloudconnector.operator")

__all__ = ["handlers", "indexes", "main", "protection"]


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    # kubeconfig (exec plugins, token files), in-cluster account or CLOUDCONNECTOR_K8S_SERVER.
    return await kopf_connection_info(KubeConfig.from_env())


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = handlers.CONFIG
    configure(settings, config)
    from cloudconnector.clouds.factory import make_provisioner
    from cloudconnector.keystore.vault import VaultKeyStore

    kube = KubeClient(KubeConfig.from_env())
    secrets = SecretAccess(kube)
    keys = VaultKeyStore.from_env()
    memo["runtime"] = Runtime(
        config=config,
        kube=kube,
        keys=keys,
        pool=build_pool(config, make_provisioner, secrets),
        secrets=secrets,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime | None = memo.get("runtime")
    if runtime is None:
        return
    await runtime.pool.aclose()
    await runtime.kube.aclose()
    close = getattr(runtime.keys, "close", None)
    if callable(close):
        close()


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.persistence.finalizer = api.FINALIZER
    # kopf ignores every annotation under the prefix of its own storage when diffing, so that
    # prefix must not be cloudconnector.io: the rotate annotation lives there and must count.
    prefix = f"kopf.{api.GROUP}"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.persistence.consistency_timeout = config.consistency_timeout
    settings.posting.level = logging.INFO
    # Events come from the reconcilers (one per step or new problem), not from kopf's log lines,
    # which would post "Handler ... succeeded" and every retry as an event.
    settings.posting.loggers = False
    settings.posting.reporting_component = "cloud-connector"
    settings.scanning.disabled = not config.namespace_scanning
    settings.peering.standalone = config.peering is None
    if config.peering is not None:
        settings.peering.name = config.peering
        settings.peering.mandatory = True
        settings.peering.clusterwide = not config.namespaces
        # kopf pauses a replica only for a peer of *higher* priority; equal priorities would let
        # both replicas work at once. A random one per process makes exactly one of them active.
        settings.peering.priority = 1 + secrets.randbelow(2**31 - 1)


PREFLIGHT_PATIENCE = 60.0
"""Seconds to wait for an unreachable API server before giving up at start-up."""


async def _preflight(config: OperatorConfig) -> str | None:
    """None when the operator can work here, else the one line that says why not."""
    kube = KubeClient(KubeConfig.from_env())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PREFLIGHT_PATIENCE
    try:
        while True:
            try:
                await preflight.check(kube, config)
                return None
            except preflight.CannotStart as e:
                return str(e)
            except KubeError as e:
                if loop.time() > deadline:
                    return f"the Kubernetes API at {kube.config.server} did not answer: {e}"
                logger.warning("waiting for the Kubernetes API: %s", e)
                await asyncio.sleep(2.0)
    finally:
        await kube.aclose()


def main(argv: list[str] | None = None) -> int:
    del argv
    level = os.environ.get("CLOUDCONNECTOR_LOG_LEVEL", "INFO").upper()
    as_json = os.environ.get("CLOUDCONNECTOR_LOG_JSON", "true").strip().lower() not in OFF
    logs.configure(level, as_json)
    config = handlers.CONFIG
    problem = asyncio.run(_preflight(config))
    if problem is not None:
        logger.critical("cannot start: %s", problem)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(
        kopf.operator(
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            standalone=config.peering is None,
            peering_name=config.peering,
            liveness_endpoint=config.liveness,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
