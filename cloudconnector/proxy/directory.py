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
    ) and (a.topic_prefix, a.topic_error) == (b.topic_prefix, b.topic_error)  # topics rewritten anew


def _claims(route: Route) -> tuple[Claim, ...]:
    return claims(route.ip, route.iccid)


class StaticDirectory:
    """Routes held in memory, replaced wholesale or one by one."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[ObjectRef, Route] = {}
        # Identity key -> its one claimant, or all of them once there are several (the rare case
        # gets the dict, so the index costs no more than one entry per key).
        self._claims: dict[Claim, Route | dict[ObjectRef, Route]] = {}
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
            claim: tuple(sorted(held, key=str))
            for claim, held in self._claims.items()
            if isinstance(held, dict)
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
        self._claims = {}
        for route in new.values():
            self._index(route)
        revoked += self._newly_ambiguous(before, list(self._claims))
        self._notify(list(dict.fromkeys(revoked)))

    def put(self, route: Route) -> None:
        """Add or update one device's route (constant time: the watch calls this per event)."""
        old = self._routes.get(route.device)
        before = {c: tuple(held) for c in _claims(route) if isinstance(held := self._claims.get(c), dict)}
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
        held = self._claims.get(claim)
        if held is None or isinstance(held, Route):
            return held
        raise AmbiguousIdentity(claim[0], claim[1], tuple(sorted(held, key=str)))

    def _index(self, route: Route) -> None:
        for claim in _claims(route):
            held = self._claims.get(claim)
            if held is None or (isinstance(held, Route) and held.device == route.device):
                self._claims[claim] = route
            elif isinstance(held, Route):
                self._claims[claim] = {held.device: held, route.device: route}
            else:
                held[route.device] = route

    def _unindex(self, route: Route) -> None:
        for claim in _claims(route):
            held = self._claims.get(claim)
            if isinstance(held, Route):
                if held.device == route.device:
                    del self._claims[claim]
            elif held is not None:
                held.pop(route.device, None)
                if len(held) == 1:
                    (only,) = held.values()
                    self._claims[claim] = only
                    log.info(
                        "identity claimed once again",
                        extra={"identity": claim[0], "device": str(only.device)},
                    )

    def _newly_ambiguous(
        self, before: dict[Claim, tuple[ObjectRef, ...]], where: Iterable[Claim]
    ) -> list[ObjectRef]:
        """Claimants of keys that became ambiguous: their live sessions must end. Logged once per
        key, with the claimants (the value itself may be an ICCID: it stays out of the log)."""
        revoked: list[ObjectRef] = []
        for claim in where:
            held = self._claims.get(claim)
            if isinstance(held, dict) and set(before.get(claim, ())) != set(held):
                refs = sorted(held, key=str)
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
