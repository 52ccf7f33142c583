"""An in-memory device directory that tells the proxy when a live session must end.

The proxy looks devices up through :class:`cloudconnector.routes.Directory`. Directories that
change at run time (the Kubernetes watch, the standalone reconciler) also implement
:class:`Revocations`: when a device disappears or its route changes (new certificate after a
rotation, another endpoint after a move), subscribers hear its ``ObjectRef`` and end its session.

Every identity key (address, ICCID) maps to the set of devices that claim it. One claimant is
served; two or more make the key ambiguous: lookups raise
:class:`~cloudconnector.routes.AmbiguousIdentity` and the live sessions of all claimants end, so
that a device can never be given another device's cloud identity because of which one the index
happened to see last. The operator reports the same clash as ``Conflict`` on both Devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from cloudconnector.identity import Claim, IdentityKey, canonical_ip, claims
from cloudconnector.model import ObjectRef
from cloudconnector.routes import AmbiguousIdentity, Route

log = logging.getLogger(__name__)

RevokeCallback = Callable[[ObjectRef], None]

# Kept under its old name: the listener folds peer addresses with it.
normalize_ip = canonical_ip


@runtime_checkable
class Revocations(Protocol):
    def subscribe(self, callback: RevokeCallback) -> None: ...


def _same_session(a: Route, b: Route) -> bool:
    """Whether a live session made for ``a`` is still right under ``b``."""
    return (a.endpoint_type, a.host, a.port, a.client_id, a.certificate_id, a.ca_pem) == (
        b.endpoint_type,
        b.host,
        b.port,
        b.client_id,
        b.certificate_id,
        b.ca_pem,
    )


def _claims(route: Route) -> tuple[Claim, ...]:
    return claims(route.ip, route.iccid)


class StaticDirectory:
    """Routes held in memory, replaced wholesale or one by one."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[ObjectRef, Route] = {}
        self._claimants: dict[Claim, dict[ObjectRef, Route]] = {}
        self._subscribers: list[RevokeCallback] = []
        self.replace(routes)

    def subscribe(self, callback: RevokeCallback) -> None:
        self._subscribers.append(callback)

    def by_ip(self, ip: str) -> Route | None:
        try:
            return self._lookup((IdentityKey.IP, canonical_ip(ip)))
        except ValueError:
            return None

    def by_iccid(self, iccid: str) -> Route | None:
        return self._lookup((IdentityKey.ICCID, iccid))

    def ambiguous(self) -> dict[Claim, tuple[ObjectRef, ...]]:
        """Every identity key claimed by more than one device, with its claimants."""
        return {
            claim: tuple(sorted(holders, key=str))
            for claim, holders in self._claimants.items()
            if len(holders) > 1
        }

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def replace(self, routes: Iterable[Route]) -> None:
        """Make ``routes`` the whole directory; sessions of removed or changed devices end."""
        new = {r.device: r for r in routes}
        revoked = [
            ref for ref, old in self._routes.items() if ref not in new or not _same_session(old, new[ref])
        ]
        before = self.ambiguous()
        self._routes = new
        self._claimants = {}
        for route in new.values():
            self._index(route)
        revoked += self._newly_ambiguous(before)
        self._notify(list(dict.fromkeys(revoked)))

    def put(self, route: Route) -> None:
        """Add or update one device's route (constant time: the watch calls this per event)."""
        old = self._routes.get(route.device)
        before = {c: refs for c in _claims(route) if len(refs := tuple(self._claimants.get(c, ()))) > 1}
        self._routes[route.device] = route
        if old is not None:
            self._unindex(old)
        self._index(route)
        revoked = [route.device] if old is not None and not _same_session(old, route) else []
        revoked += self._newly_ambiguous(before, _claims(route))
        self._notify(list(dict.fromkeys(revoked)))

    def remove(self, device: ObjectRef) -> None:
        old = self._routes.pop(device, None)
        if old is not None:
            self._unindex(old)
            self._notify([device])

    def get(self, device: ObjectRef) -> Route | None:
        return self._routes.get(device)

    def _lookup(self, claim: Claim) -> Route | None:
        holders = self._claimants.get(claim)
        if not holders:
            return None
        if len(holders) > 1:
            raise AmbiguousIdentity(claim[0], claim[1], tuple(sorted(holders, key=str)))
        return next(iter(holders.values()))

    def _index(self, route: Route) -> None:
        for claim in _claims(route):
            self._claimants.setdefault(claim, {})[route.device] = route

    def _unindex(self, route: Route) -> None:
        for claim in _claims(route):
            holders = self._claimants.get(claim)
            if holders is None:
                continue
            holders.pop(route.device, None)
            if not holders:
                del self._claimants[claim]
            elif len(holders) == 1:
                remaining = str(next(iter(holders)))
                log.info("identity claimed once again", extra={"identity": claim[0], "device": remaining})

    def _newly_ambiguous(
        self, before: dict[Claim, tuple[ObjectRef, ...]], where: Iterable[Claim] | None = None
    ) -> list[ObjectRef]:
        """Claimants of keys that became ambiguous: their live sessions must end. Logged once per
        key, with the claimants (the value itself may be an ICCID: it stays out of the log)."""
        keys = self._claimants.keys() if where is None else where
        revoked: list[ObjectRef] = []
        for claim in keys:
            holders = self._claimants.get(claim) or {}
            if len(holders) > 1 and set(before.get(claim, ())) != set(holders):
                refs = sorted(holders, key=str)
                devices = ", ".join(map(str, refs))
                log.warning(
                    "%s identity claimed by several devices (%s): refused to all of them",
                    claim[0],
                    devices,
                    extra={"identity": claim[0], "devices": devices},
                )
                revoked += refs
        return revoked

    def _notify(self, refs: list[ObjectRef]) -> None:
        for ref in refs:
            for callback in self._subscribers:
                try:
                    callback(ref)
                except Exception:
                    log.exception("revocation subscriber failed for %s", ref)
