"""The proxy's device directory, kept current from the Kubernetes API (list, then watch).

It follows Devices, Groups and Endpoints in the proxy's :class:`~cloudconnector.identity.Scope`
(one namespace, a list or pattern of them, or all), and after every change updates identity ->
Route with :func:`cloudconnector.routes.route_of` (the join of :mod:`cloudconnector.core.inventory`
and the one definition of which status fields make a device usable). Updates go through a
:class:`StaticDirectory`, so a device that is deleted, stops being Ready, gets a new certificate or
moves to another endpoint has its live session ended; an identity two devices claim is refused to
both. The proxy only reads these resources: its RBAC
role needs list and watch, nothing else. A scope of several namespaces is watched cluster-wide and
objects outside it are ignored, so the index holds exactly the namespaces the operator checks
conflicts in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cloudconnector import api
from cloudconnector.core.inventory import MemoryInventory, endpoint_name, group_name
from cloudconnector.errors import short
from cloudconnector.identity import Scope
from cloudconnector.kube.client import KubeClient, KubeError, Resource
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.directory import RevokeCallback, StaticDirectory
from cloudconnector.routes import Route, route_of

log = logging.getLogger(__name__)

DEVICES = Resource(api.GROUP, api.VERSION, api.DEVICES)
GROUPS = Resource(api.GROUP, api.VERSION, api.GROUPS)
ENDPOINTS = Resource(api.GROUP, api.VERSION, api.ENDPOINTS)

Key = tuple[str, str]
Obj = dict[str, Any]


def _key(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class KubeDirectory:
    """A :class:`~cloudconnector.routes.Directory` fed by watching the three custom resources."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str | Scope | None = None,
        *,
        retry_seconds: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.scope = namespace if isinstance(namespace, Scope) else Scope.parse(namespace)
        self.namespace = self.scope.single_namespace  # None: list and watch the whole cluster
        self.retry_seconds = retry_seconds
        self.on_change = on_change  # for tests and metrics: called after each rebuild
        self._index = StaticDirectory()
        self._objects: dict[str, dict[Key, Obj]] = {r.plural: {} for r in (DEVICES, GROUPS, ENDPOINTS)}
        self._inventory = MemoryInventory(self._objects[GROUPS.plural], self._objects[ENDPOINTS.plural])
        self._listed: set[str] = set()
        self._ready = asyncio.Event()

    def devices(self) -> list[Obj]:
        """The Device objects as last listed or watched."""
        return list(self._objects[DEVICES.plural].values())

    async def wait_ready(self) -> None:
        """Return once all three resources have been listed."""
        await self._ready.wait()

    @property
    def ready(self) -> bool:
        """True once all three resources have been listed."""
        return len(self._listed) == 3

    def by_ip(self, ip: str) -> Route | None:
        return self._index.by_ip(ip)

    def by_iccid(self, iccid: str) -> Route | None:
        return self._index.by_iccid(iccid)

    def subscribe(self, callback: RevokeCallback) -> None:
        self._index.subscribe(callback)

    def routes(self) -> list[Route]:
        return self._index.routes()

    async def run(self) -> None:
        """Follow all three resources until cancelled; API errors are retried, never raised."""
        await asyncio.gather(*(self._follow(res) for res in (DEVICES, GROUPS, ENDPOINTS)))

    async def _follow(self, res: Resource) -> None:
        while True:
            try:
                listing = await self.client.request("GET", res.path(self.namespace)) or {}
                items = (o for o in listing.get("items") or [] if self._covers(o))
                store = self._objects[res.plural]  # in place: the inventory holds these dicts
                store.clear()
                store.update((_key(o), o) for o in items)
                self._listed.add(res.plural)
                if self.ready:
                    self._ready.set()
                self._rebuild()
                version = (listing.get("metadata") or {}).get("resourceVersion")
                await self._watch(res, version)
            except KubeError as e:
                log.warning("watching %s failed, retrying: %s", res.plural, short(e, 200))
                await asyncio.sleep(self.retry_seconds)

    async def _watch(self, res: Resource, version: str | None) -> None:
        store = self._objects[res.plural]
        async for event in self.client.watch(res, self.namespace, resource_version=version):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":  # e.g. 410 Gone: our version is too old; list again
                return
            if kind == "BOOKMARK" or not self._covers(obj):
                continue
            key = _key(obj)
            if kind == "DELETED":
                store.pop(key, None)
            else:
                store[key] = obj
            self._changed(res, key)
        # The server closed the stream (watches time out); the caller lists again.

    def _covers(self, obj: Obj) -> bool:
        return self.scope.covers(_key(obj)[0])

    def _changed(self, res: Resource, key: Key) -> None:
        """Recompute only the routes one event can affect: O(1) for a device, a scan for the
        rarer group and endpoint changes."""
        if not self.ready:
            return
        namespace, name = key
        if res is DEVICES:
            self._refresh(key)
        else:
            for dkey, device in self._objects[DEVICES.plural].items():
                if dkey[0] != namespace:
                    continue
                group = group_name(device)
                related = (
                    group if res is GROUPS else endpoint_name(self._inventory.group(namespace, group or ""))
                )
                if related == name:
                    self._refresh(dkey)
        if self.on_change is not None:
            self.on_change()

    def _route(self, key: Key) -> Route | None:
        device = self._objects[DEVICES.plural].get(key)
        return None if device is None else route_of(self._inventory, device)

    def _refresh(self, key: Key) -> None:
        route = self._route(key)
        if route is None:
            self._index.remove(ObjectRef(*key))
        else:
            self._index.put(route)

    def _rebuild(self) -> None:
        """Everything from scratch: after a (re)list."""
        if not self.ready:
            return
        routes = [r for r in map(self._route, self._objects[DEVICES.plural]) if r is not None]
        self._index.replace(routes)
        if self.on_change is not None:
            self.on_change()
