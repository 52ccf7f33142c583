"""kmock 0.8 set up as the Kubernetes API server for kopf (used by the tests and bench/).

kopf needs from kmock: the bundled built-in resources (events, namespaces), our three CRDs as
namespaced resources with a status subresource, and two pieces of API-server behaviour kmock leaves
to subclasses: a fresh ``resourceVersion`` on every write and a 422 for a failed JSON-patch test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import aiohttp.web
import attrs
import jsonpatch
import kmock as kmocklib
import yaml

ROOT = Path(__file__).resolve().parents[2]


@attrs.define(kw_only=True)
class ApiServer(kmocklib.KubernetesEmulator):
    """kmock's emulator plus the two metadata fields a real API server maintains and kopf relies
    on: a new ``resourceVersion`` on every write (kopf's patch-consistency check), a
    ``generation`` bumped by spec changes (``observedGeneration``), and names made from
    ``generateName`` (kopf's events). kmock's docs invite subclassing
    for such field semantics; everything else is kmock's own behaviour."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1000), init=False)
    keep_requests: int | None = None
    """Forget all but this many past requests (bench/ only): kmock matches each request against its
    whole history, which makes a run of thousands of requests quadratic."""
    _inflight: set[kmocklib.Request] = attrs.field(factory=set, init=False)

    async def _handle(self, request: kmocklib.Request) -> aiohttp.web.StreamResponse:
        self._inflight.add(request)
        try:
            self._forget_old_requests()
            return await self._handle_write_fields(request)
        finally:
            self._inflight.discard(request)

    def _forget_old_requests(self) -> None:
        keep = self.keep_requests
        if keep is None or len(self._requests) <= 2 * keep:
            return
        recent = self._requests[-keep:]
        recent_ids = {id(r) for r in recent}
        # Requests still being served (watch streams, requests queued on the emulator's lock) must
        # stay findable, or kmock would no longer route them.
        pending = [r for r in self._requests[:-keep] if r in self._inflight and id(r) not in recent_ids]
        self._requests[:] = pending + recent

    async def _handle_write_fields(self, request: kmocklib.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        writing = request.action in (kmocklib.action.CREATE, kmocklib.action.UPDATE)
        if request.resource is not None and writing and isinstance(data, list):  # JSON patch
            data.append(
                {"op": "add", "path": "/metadata/resourceVersion", "value": str(next(self._versions))}
            )
        if request.resource is not None and writing and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if request.action == kmocklib.action.CREATE and meta.get("generateName") and not meta.get("name"):
                # As the API server does (kopf's events use it); kmock would key them all by None.
                meta["name"] = f"{meta['generateName']}{next(self._versions):x}"
            if request.action == kmocklib.action.UPDATE and "spec" in data and not request.subresource:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = self.objects[key].get("metadata", {}).get("generation") or 1
                    meta["generation"] = int(current) + 1
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # A failed JSON-patch "test" (kopf's optimistic lock on resourceVersion) is a 422 in
        # Kubernetes; kmock would answer 500 and kopf would retry the stale patch for a minute.
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            exc = kmocklib.KubernetesError(status=422, reason="Invalid", message="resourceVersion changed")
        return await super()._render_error(exc)


def register_crds(kmock: kmocklib.KubernetesEmulator) -> None:
    kmock.resources.load_bundled()
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        names = crd["spec"]["names"]
        for version in crd["spec"]["versions"]:
            kmock.resources[f"{crd['spec']['group']}/{version['name']}/{names['plural']}"] = (
                kmocklib.ResourceInfo(
                    kind=names["kind"],
                    singular=names["singular"],
                    namespaced=crd["spec"]["scope"] == "Namespaced",
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=set((version.get("subresources") or {}).keys()),
                )
            )
