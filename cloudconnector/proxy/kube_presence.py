"""Connection status written to the Device's ``status.connection`` through the status subresource.

Only that one field is ever written, with a merge patch, so the operator's status fields are never
touched. The end of a session is written with a JSON patch that first tests that this proxy is
still the one recorded: when a device has meanwhile reconnected through another replica, the older
replica's "disconnected" must not overwrite the newer "connected".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

from cloudconnector import api
from cloudconnector.kube.client import KubeClient, KubeError, Resource
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.presence import ConnectionStatus

log = logging.getLogger("cloudconnector.proxy.presence")

DEVICES = Resource(api.GROUP, api.VERSION, api.DEVICES)
JSON_PATCH = "application/json-patch+json"


class KubePresenceSink:
    """:class:`~cloudconnector.proxy.presence.PresenceSink` over the API server."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        try:
            await self.client.patch(
                DEVICES, device.namespace, device.name, {"status": {"connection": dict(status)}}, status=True
            )
        except KubeError as e:
            if e.status != 404:  # a Device deleted meanwhile has no status to show
                raise

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        patch = [
            {"op": "test", "path": "/status/connection/proxy", "value": proxy},
            {"op": "replace", "path": "/status/connection", "value": dict(status)},
        ]
        try:
            await self.client.request(
                "PATCH",
                DEVICES.path(device.namespace, device.name, "status"),
                body=patch,
                content_type=JSON_PATCH,
            )
        except KubeError as e:
            # 422: another proxy holds the device now (or none recorded); 404: the Device is gone.
            if e.status in (404, 422):
                return False
            raise
        return True

    async def clear_stale(self, proxy: str, devices: Iterable[Mapping[str, Any]]) -> int:
        """After a restart under the same name (a container restarted in its pod): devices still
        shown connected through this proxy are not, their sessions died with the old process.
        ``devices`` are the Device objects the directory listed; returns how many were corrected."""
        done = 0
        for obj in devices:
            connection = (obj.get("status") or {}).get("connection") or {}
            if not (connection.get("connected") and connection.get("proxy") == proxy):
                continue
            meta = obj.get("metadata") or {}
            ended = cast(ConnectionStatus, {**connection, "connected": False})
            if await self.write_ended(ObjectRef(meta["namespace"], meta["name"]), ended, proxy):
                done += 1
        return done
