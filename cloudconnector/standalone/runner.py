"""The standalone reconcile loop: manifests in a directory, status in SQLite, the operator's core.

This module plays the part the API server and kopf play in a cluster: it turns "what the files
say" into calls to the same reconcilers the operator uses (``cloudconnector.core``), persists
every status write they make, and decides what was removed. Deletion is conservative: an object
is only finalized when the file that defined it is gone or parsed cleanly without it, never when
its file failed to parse; an Endpoint stays known until no device holds an identity there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cloudconnector import api, schema
from cloudconnector.core.conflicts import Peer, PeerIndex
from cloudconnector.core.device import DeviceReconciler, has_identity
from cloudconnector.core.endpoint import Usage, check_endpoint, set_revocable
from cloudconnector.core.group import group_status
from cloudconnector.core.inventory import MemoryInventory, endpoint_name
from cloudconnector.core.provisioners import ProvisionerPool
from cloudconnector.errors import (
    ConnectorError,
    CredentialsError,
    InvalidSpec,
    PermanentError,
    TransientError,
)
from cloudconnector.keystore.base import KeyWriter
from cloudconnector.model import Device, Endpoint, ObjectRef, parse_device, parse_endpoint, parse_group
from cloudconnector.routes import Route, route_of
from cloudconnector.standalone.manifests import Manifest, ManifestError, Snapshot, load_dir
from cloudconnector.standalone.slices import Slicer
from cloudconnector.standalone.store import StateStore, StoredObject
from cloudconnector.standalone.watch import DirWatch, signature
from cloudconnector.vocabulary import DevicePhase, EndpointPhase

logger = logging.getLogger(__name__)

CREDENTIALS_RETRY = 60.0
# With DIR unchanged, a pass over the last snapshot this often: Endpoint checks, certificate
# renewals, failures to retry. DIR is not read for it: file events say when that is needed.
IDLE_RECHECK = 60.0

T = TypeVar("T")
RoutesSink = Callable[[list[Route]], None]
RouteChangeSink = Callable[[list[Route], list[ObjectRef]], None]  # (added or changed, removed)
DeviceSink = Callable[[ObjectRef, Mapping[str, Any]], None]


@dataclass
class PassResult:
    """What one reconcile pass did; ``retry_in`` is set when something asked to be retried."""

    errors: list[ManifestError] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # "ns/name" -> message (permanent)
    retry_in: float | None = None
    pending: int = 0

    def want_retry(self, delay: float) -> None:
        self.retry_in = delay if self.retry_in is None else min(self.retry_in, delay)


class SecretsView:
    """Secrets read from the manifest directory: Endpoint API keys and manual device credentials."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, str]] = {}

    def update(self, secrets: Mapping[tuple[str, str], dict[str, str]]) -> None:
        """Take the Secrets now in DIR. One removed from DIR is still remembered (in memory only)
        so that removing an Endpoint's files together can still deprovision its devices."""
        self.data = {**self.data, **secrets}

    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        found = self.data.get((namespace, name))
        return None if found is None else {k: v.encode() for k, v in found.items()}

    async def credentials(self, endpoint: Endpoint) -> Mapping[str, str]:
        """The Endpoint's Secret from DIR; without one, the cloud SDK's own environment chain."""
        name = None
        if endpoint.aws is not None:
            name = endpoint.aws.credentials_secret
        elif endpoint.azure is not None:
            name = endpoint.azure.credentials_secret
        if name is None:
            return {}
        found = self.data.get((endpoint.ref.namespace, name))
        return dict(found) if found is not None else {}


class Runner:
    def __init__(
        self,
        directory: Path,
        store: StateStore,
        keys: KeyWriter,
        pool: ProvisionerPool,
        secrets: SecretsView,
        *,
        concurrency: int = 32,
        on_routes: RoutesSink | None = None,
        on_route_changes: RouteChangeSink | None = None,
        on_device: DeviceSink | None = None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.secrets = secrets
        self._pool = pool
        self._devices = DeviceReconciler(pool, keys, self._lookup_endpoint, secrets)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        # Passes share the loop with the proxy: they run in slices, and what needs no loop runs
        # in a worker thread (the store is shared with threads).
        self._slicer = Slicer()
        self._applied: dict[tuple[str, str, str], tuple[str, Mapping[str, Any]]] = {}
        self._published: dict[ObjectRef, Route] = {}
        self._pass_cache: dict[tuple[str, str, str], tuple[StoredObject | None, Any]] = {}
        self._on_routes = on_routes
        self._on_route_changes = on_route_changes
        self._on_device = on_device
        self._not_before: dict[str, float] = {}  # device key -> monotonic time of next retry
        self._failed: dict[str, int] = {}  # device key -> generation that failed permanently

    # -- lookups over the store --------------------------------------------------------------

    def _lookup_endpoint(self, namespace: str, name: str) -> Endpoint | None:
        obj = self.store.get(api.KIND_ENDPOINT, ObjectRef(namespace, name))
        return None if obj is None else parse_endpoint(obj.body)

    def _save(self, kind: str, ref: ObjectRef) -> Callable[[dict[str, Any]], Any]:
        async def save(status: dict[str, Any]) -> None:
            self.store.set_status(kind, ref, status)
            if kind == api.KIND_DEVICE and self._on_device is not None:
                self._on_device(ref, status)

        return save

    # -- one pass --------------------------------------------------------------------------

    def read(self) -> Snapshot:
        if not self.directory.is_dir():
            raise PermanentError(f"{self.directory} is not a directory", reason="NoManifests")
        return load_dir(self.directory)

    def _immutable_changes(self, manifest: Manifest) -> ManifestError | None:
        kind, namespace, name = manifest.key
        stored = self.store.get(kind, ObjectRef(namespace, name))
        if stored is None:
            return None
        errors = schema.validate_update(stored.body, manifest.body)
        if not errors:
            return None
        fields = "; ".join(str(e) for e in errors)
        return ManifestError(manifest.source, f"{kind} {namespace}/{name}: {fields}")

    async def reconcile(self, snap: Snapshot | None = None) -> PassResult:
        """Apply the directory once: store what it says, reconcile everything, finalize removals."""
        snap = snap if snap is not None else self.read()
        result = PassResult(errors=list(snap.errors))
        for error in snap.errors:
            logger.error("%s", error)
        self.secrets.update(snap.secrets)
        wanted = {m.key for m in snap.manifests}
        for manifest in snap.manifests:
            await self._slicer.pause()
            if self._applied.get(manifest.key) == (manifest.source, manifest.body):
                continue  # stored exactly so already: nothing to check or write
            if refused := self._immutable_changes(manifest):
                # As the API server would: the stored object stays as it was.
                result.errors.append(refused)
                logger.error("%s", refused)
                continue
            self.store.apply(manifest.kind, manifest.body, manifest.source)
            self._applied[manifest.key] = (manifest.source, manifest.body)

        def removed(obj: StoredObject) -> bool:
            return (
                obj.kind,
                obj.ref.namespace,
                obj.ref.name,
            ) not in wanted and obj.source not in snap.failed_files

        await self._endpoints(removed)
        await self._devices_pass(removed, result)
        # Store reads and pure functions over every Device: a worker thread, not the relay's.
        await asyncio.to_thread(self._groups, removed)
        await asyncio.to_thread(self._endpoint_usage, removed)
        await asyncio.to_thread(self._forget_endpoints, removed)
        await self._publish()
        return result

    async def _endpoints(self, removed: Callable[[StoredObject], bool]) -> None:
        """Check every Endpoint's credentials and data endpoint before its devices need it."""
        for obj in self.store.list(api.KIND_ENDPOINT):
            if removed(obj):
                continue
            endpoint = parse_endpoint(obj.body)
            usage = await asyncio.to_thread(self._usage, endpoint)
            status = await check_endpoint(endpoint, self._pool, obj.status, usage)
            if status != obj.status:
                self.store.set_status(api.KIND_ENDPOINT, obj.ref, status)

    def _endpoint_usage(self, removed: Callable[[StoredObject], bool]) -> None:
        """After the devices' pass: may the Endpoints' API keys be revoked now (IAM hygiene)?"""
        for obj in self.store.list(api.KIND_ENDPOINT):
            if removed(obj):
                continue
            endpoint = parse_endpoint(obj.body)
            status = dict(obj.status)
            set_revocable(status, endpoint, self._usage(endpoint))
            if status != obj.status:
                self.store.set_status(api.KIND_ENDPOINT, obj.ref, status)

    def _usage(self, endpoint: Endpoint) -> Usage:
        groups = {
            g.ref.name
            for g in self.store.list(api.KIND_GROUP, endpoint.ref.namespace)
            if endpoint_name(g.body) == endpoint.ref.name
        }
        users = [
            d
            for d in self.store.list(api.KIND_DEVICE, endpoint.ref.namespace)
            if d.body.get("spec", {}).get("group") in groups
        ]
        return Usage(len(users), sum(1 for d in users if d.status.get("phase") == DevicePhase.READY))

    async def _devices_pass(self, removed: Callable[[StoredObject], bool], result: PassResult) -> None:
        objects, peers = await asyncio.to_thread(self._peers, removed)
        self._pass_cache.clear()
        now = time.monotonic()
        tasks: list[Coroutine[Any, Any, None]] = []
        for obj in objects:
            await self._slicer.pause()
            key = str(obj.ref)
            if self._not_before.get(key, 0.0) > now:
                result.want_retry(self._not_before[key] - now)
                result.pending += 1
                continue
            if removed(obj):
                tasks.append(self._finalize(obj, result))
            elif self._failed.get(key) == obj.body["metadata"]["generation"]:
                result.failed[key] = str(obj.status.get("message") or "failed")
            else:
                tasks.append(self._reconcile_device(obj, peers, result))
        await self._run_sliced(tasks)

    async def _run_sliced(self, work: list[Coroutine[Any, Any, None]]) -> None:
        """Run ``work``, at most ``concurrency`` at once, each started in a slice of the loop (not
        thousands of tasks started in one turn of the loop, as gathering them all would)."""
        pending = iter(work)

        async def worker() -> None:
            for job in pending:
                await self._slicer.pause()
                await job

        try:
            await asyncio.gather(*(worker() for _ in range(min(self._concurrency, len(work)))))
        finally:
            for job in pending:  # only after a bug raised out of a worker
                job.close()

    def _once_per_pass(
        self, kind: str, ref: ObjectRef, parse: Callable[[Mapping[str, Any]], T]
    ) -> tuple[StoredObject | None, T | None]:
        """A Group or Endpoint as stored, read and parsed once per devices' pass: thousands of
        Devices share a few, and nothing in that pass changes them."""
        key = (kind, ref.namespace, ref.name)
        if key not in self._pass_cache:
            obj = self.store.get(kind, ref)
            self._pass_cache[key] = (obj, parse(obj.body) if obj is not None else None)
        found: tuple[StoredObject | None, T | None] = self._pass_cache[key]
        return found

    def _peers(self, removed: Callable[[StoredObject], bool]) -> tuple[list[StoredObject], PeerIndex]:
        """Every Device and the identity index of the live ones (in a worker thread)."""
        objects = self.store.list(api.KIND_DEVICE)
        live = [o for o in objects if not removed(o)]
        # One proxy serves every namespace of the store: identities are unique across all of them.
        parsed: list[Peer] = []
        for obj in live:
            with contextlib.suppress(InvalidSpec):  # reported by _reconcile_device
                parsed.append(Peer.of(parse_device(obj.body)))  # the prefix does not matter here
        return objects, PeerIndex(parsed)

    async def _reconcile_device(self, obj: StoredObject, peers: PeerIndex, result: PassResult) -> None:
        namespace = obj.ref.namespace
        _, group = self._once_per_pass(
            api.KIND_GROUP, ObjectRef(namespace, obj.body["spec"]["group"]), parse_group
        )
        endpoint_obj, endpoint = (
            self._once_per_pass(api.KIND_ENDPOINT, ObjectRef(namespace, group.endpoint), parse_endpoint)
            if group is not None
            else (None, None)
        )
        try:
            # The thing name carries the prefix of the Endpoint it is made at, as in the operator.
            device = parse_device(obj.body, thing_prefix=_prefix(endpoint))
        except InvalidSpec as e:
            result.failed[str(obj.ref)] = str(e)
            return
        ready = endpoint_obj is not None and endpoint_obj.status.get("phase") == EndpointPhase.READY
        async with self._semaphore:
            await self._guard(
                device,
                result,
                self._devices.reconcile(
                    device,
                    group,
                    endpoint,
                    obj.status,
                    self._save(api.KIND_DEVICE, device.ref),
                    endpoint_ready=ready,
                    clashes=peers.clashes(device),
                ),
            )

    async def _finalize(self, obj: StoredObject, result: PassResult) -> None:
        holder = obj.status.get("endpoint")
        try:
            device = parse_device(
                obj.body,
                thing_prefix=_prefix(self._lookup_endpoint(obj.ref.namespace, holder) if holder else None),
            )
        except InvalidSpec:
            # Never parsed, so never provisioned: nothing at the cloud, nothing stored.
            self._delete(api.KIND_DEVICE, obj.ref)
            return
        async with self._semaphore:
            done = await self._guard(
                device,
                result,
                self._devices.finalize(device, obj.status, self._save(api.KIND_DEVICE, device.ref)),
            )
        if done:
            self._delete(api.KIND_DEVICE, device.ref)
            logger.info("Device %s removed", device.ref)

    async def _guard(self, device: Device, result: PassResult, work: Any) -> bool:
        """Run one reconcile; map its outcome to the retry schedule. True when it succeeded."""
        key = str(device.ref)
        try:
            await work
        except TransientError as e:
            self._not_before[key] = time.monotonic() + e.delay
            result.want_retry(e.delay)
            result.pending += 1
            return False
        except CredentialsError as e:
            # The keys may be restored or replaced in the Secret: retry, slowly.
            self._not_before[key] = time.monotonic() + CREDENTIALS_RETRY
            result.failed[key] = str(e)
            return False
        except ConnectorError as e:
            # Retrying the same input cannot help: wait for an edit, which moves the generation.
            self._failed[key] = device.generation
            result.failed[key] = str(e)
            return False
        self._not_before.pop(key, None)
        self._failed.pop(key, None)
        return True

    def _groups(self, removed: Callable[[StoredObject], bool]) -> None:
        devices = self.store.list(api.KIND_DEVICE)
        connections = self.store.connections()  # the proxy's live status, kept apart from status
        for obj in self.store.list(api.KIND_GROUP):
            if removed(obj):
                self._delete(api.KIND_GROUP, obj.ref)
                continue
            group = parse_group(obj.body)
            members = [
                {**d.status, "connection": connections.get(d.ref) or {}}
                for d in devices
                if d.ref.namespace == group.ref.namespace
                and d.body.get("spec", {}).get("group") == group.ref.name
            ]
            exists = (
                self.store.get(api.KIND_ENDPOINT, ObjectRef(group.ref.namespace, group.endpoint)) is not None
            )
            status = group_status(group, obj.status, members, endpoint_exists=exists)
            if status != obj.status:
                self.store.set_status(api.KIND_GROUP, obj.ref, status)

    def _forget_endpoints(self, removed: Callable[[StoredObject], bool]) -> None:
        devices = self.store.list(api.KIND_DEVICE)
        for obj in self.store.list(api.KIND_ENDPOINT):
            if not removed(obj):
                continue
            holders = [
                d
                for d in devices
                if d.ref.namespace == obj.ref.namespace
                and d.status.get("endpoint") == obj.ref.name
                and (has_identity(d.status) or d.status.get("progress"))
            ]
            if not holders:
                self._delete(api.KIND_ENDPOINT, obj.ref)

    def _delete(self, kind: str, ref: ObjectRef) -> None:
        self.store.delete(kind, ref)
        self._applied.pop((kind, ref.namespace, ref.name), None)

    def routes(self) -> list[Route]:
        inventory = MemoryInventory.of(
            (g.body for g in self.store.list(api.KIND_GROUP)),
            (e.body for e in self.store.list(api.KIND_ENDPOINT)),
        )
        found = (route_of(inventory, dev.body) for dev in self.store.list(api.KIND_DEVICE))
        return [route for route in found if route is not None]

    def publish_routes(self) -> None:
        """Hand the proxy every route at once (replacing its directory)."""
        routes = self.routes()
        self._published = {r.device: r for r in routes}
        if self._on_routes is not None:
            self._on_routes(routes)

    async def _publish(self) -> None:
        """Hand the proxy the routes that changed, compared in a worker thread. One by one, in
        slices, where the sink takes changes: replacing a directory of thousands at once holds
        the loop for tens of milliseconds."""
        if self._on_routes is None and self._on_route_changes is None:
            return

        def diff() -> tuple[dict[ObjectRef, Route], list[Route], list[ObjectRef]]:
            routes = {r.device: r for r in self.routes()}
            put = [r for ref, r in routes.items() if self._published.get(ref) != r]
            return routes, put, [ref for ref in self._published if ref not in routes]

        routes, put, gone = await asyncio.to_thread(diff)
        if not put and not gone:
            return
        self._published = routes
        if self._on_route_changes is None:
            assert self._on_routes is not None
            self._on_routes(list(routes.values()))
            return
        for route in put:
            await self._slicer.pause()
            self._on_route_changes([route], [])
        for ref in gone:
            await self._slicer.pause()
            self._on_route_changes([], [ref])

    # -- loops -----------------------------------------------------------------------------

    async def run_until_settled(self, limit: float = 300.0) -> PassResult:
        """``run --once``: passes until nothing waits for a retry (or ``limit`` seconds pass)."""
        deadline = time.monotonic() + limit
        snap = await asyncio.to_thread(self.read)
        while True:
            result = await self.reconcile(snap)
            if result.retry_in is None or time.monotonic() + result.retry_in > deadline:
                return result
            await asyncio.sleep(result.retry_in)

    async def watch(self, interval: float = 1.0) -> None:
        """``run --watch``: reconcile when DIR changed and whenever a retry or re-check is due.

        File events (or, without inotify, a stat poll every ``interval`` s) wake it; a signature
        of DIR (names, inodes, sizes, mtimes) decides whether to read it again, which happens in
        a worker thread. Passes between changes work from the last snapshot, never re-read DIR.
        """
        files = DirWatch(self.directory, poll=interval)
        seen: object = None
        snap: Snapshot | None = None
        due = 0.0  # when the next pass is due with DIR unchanged
        try:
            while True:
                files.arm()  # before reading, so that no change made after it goes unseen
                try:
                    now_seen = await asyncio.to_thread(signature, self.directory)
                    if now_seen != seen:
                        seen, due = now_seen, 0.0
                        snap = await asyncio.to_thread(self.read)
                except ConnectorError as e:  # e.g. DIR vanished: say so, keep what exists
                    logger.error("%s", e)
                    snap = None
                except Exception:  # a bug (or an unlistable subdirectory) must not end the watch
                    logger.exception("reading %s failed; the last good reading stays", self.directory)
                if snap is not None and time.monotonic() >= due:
                    due = time.monotonic() + IDLE_RECHECK
                    try:
                        result = await self.reconcile(snap)
                    except ConnectorError as e:
                        logger.error("%s", e)
                    except Exception:  # a bug must not take the proxy down with it
                        logger.exception("reconcile pass failed")
                    else:
                        if result.retry_in is not None:
                            due = time.monotonic() + min(result.retry_in, IDLE_RECHECK)
                    _settle_heap()
                await files.wait(due - time.monotonic() if snap is not None else IDLE_RECHECK)
        finally:
            files.close()


def _settle_heap() -> None:
    """Take what survived a pass out of the collector's view (as the proxy does at start-up).

    A full collection walks every tracked object under the GIL, relays included: at thousands of
    Devices that paused the loop for 50-150 ms (bench/standalone_stall.py). Young garbage is
    collected first; what is frozen is still freed when no longer referenced, only a reference
    cycle among frozen objects would outlive its use (none was found after passes, see
    docs/benchmarks.md).
    """
    gc.collect(1)
    gc.freeze()


def _prefix(endpoint: Endpoint | None) -> str:
    return endpoint.aws.thing_prefix if endpoint is not None and endpoint.aws is not None else ""
