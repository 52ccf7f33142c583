"""An in-memory device directory that tells the proxy when a live session must end.

The proxy looks devices up through :class:`cloudconnector.routes.Directory`. Directories that
change at run time (the Kubernetes watch, the standalone reconciler) also implement
:class:`Revocations`: when a device disappears or its route changes (new certificate after a
rotation, another endpoint after a move), subscribers hear its ``ObjectRef`` and end its session.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from cloudconnector.model import ObjectRef
from cloudconnector.routes import Route

log = logging.getLogger(__name__)

RevokeCallback = Callable[[ObjectRef], None]


@runtime_checkable
class Revocations(Protocol):
    def subscribe(self, callback: RevokeCallback) -> None: ...


def normalize_ip(ip: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 becomes IPv4, IPv6 is compressed."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


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


class StaticDirectory:
    """Routes held in memory, replaced wholesale or one by one."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[ObjectRef, Route] = {}
        self._by_ip: dict[str, Route] = {}
        self._by_iccid: dict[str, Route] = {}
        self._subscribers: list[RevokeCallback] = []
        self.replace(routes)

    def subscribe(self, callback: RevokeCallback) -> None:
        self._subscribers.append(callback)

    def by_ip(self, ip: str) -> Route | None:
        try:
            return self._by_ip.get(normalize_ip(ip))
        except ValueError:
            return None

    def by_iccid(self, iccid: str) -> Route | None:
        return self._by_iccid.get(iccid)

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def replace(self, routes: Iterable[Route]) -> None:
        """Make ``routes`` the whole directory; sessions of removed or changed devices end."""
        new = {r.device: r for r in routes}
        revoked = [
            ref for ref, old in self._routes.items() if ref not in new or not _same_session(old, new[ref])
        ]
        self._routes = new
        self._reindex()
        self._notify(revoked)

    def put(self, route: Route) -> None:
        """Add or update one device's route (constant time: the watch calls this per event)."""
        old = self._routes.get(route.device)
        self._routes[route.device] = route
        if old is not None:
            self._unindex(old)
        self._index(route)
        if old is not None and not _same_session(old, route):
            self._notify([route.device])

    def remove(self, device: ObjectRef) -> None:
        old = self._routes.pop(device, None)
        if old is not None:
            self._unindex(old)
            self._notify([device])

    def get(self, device: ObjectRef) -> Route | None:
        return self._routes.get(device)

    def _index(self, route: Route) -> None:
        if route.ip:
            self._by_ip[normalize_ip(route.ip)] = route
        self._by_iccid[route.iccid] = route

    def _unindex(self, route: Route) -> None:
        # Only if the entry is still this route's: two devices may (wrongly) share an address.
        if route.ip:
            ip = normalize_ip(route.ip)
            if self._by_ip.get(ip) is route:
                del self._by_ip[ip]
        if self._by_iccid.get(route.iccid) is route:
            del self._by_iccid[route.iccid]

    def _reindex(self) -> None:
        self._by_ip, self._by_iccid = {}, {}
        for route in self._routes.values():
            self._index(route)

    def _notify(self, refs: list[ObjectRef]) -> None:
        for ref in refs:
            for callback in self._subscribers:
                try:
                    callback(ref)
                except Exception:
                    log.exception("revocation subscriber failed for %s", ref)
