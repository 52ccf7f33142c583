"""Two Devices claiming the same SIM (ICCID) or the same IP address within one proxy's scope.

The proxy identifies a device by its source IP or its ICCID, so a duplicate would let one device
speak with the other's cloud identity. Uniqueness holds across the whole
:class:`~cloudconnector.identity.Scope` the proxy serves, not per namespace: two tenants in two
namespaces are exactly the case that matters. The rule, applied symmetrically:

* every Device in a clash gets the ``Conflict`` condition and phase ``Conflict``;
* none of them is provisioned while the clash lasts, and none is routed (the proxy only routes
  phase ``Ready``, and refuses an identity its index holds twice);
* a Device that already had an identity before the clash appeared (normally the older one) keeps
  it untouched — nothing is deprovisioned — and returns to ``Ready`` once the clash is resolved;
  the newcomer is never given anyone's identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cloudconnector.identity import Claim, IdentityKey, claims
from cloudconnector.model import Device, ObjectRef


@dataclass(frozen=True)
class Peer:
    """What the conflict check needs to know about another Device in the scope."""

    ref: ObjectRef
    ip: str | None
    iccid: str

    @classmethod
    def of(cls, device: Device) -> Peer:
        return cls(device.ref, device.ip, device.iccid)

    @property
    def claims(self) -> tuple[Claim, ...]:
        return claims(self.ip, self.iccid)


@dataclass(frozen=True)
class Clash:
    field: IdentityKey
    value: str
    others: tuple[ObjectRef, ...]

    @property
    def reason(self) -> str:
        return "DuplicateIp" if self.field is IdentityKey.IP else "DuplicateIccid"

    def describe(self) -> str:
        what = "IP address" if self.field is IdentityKey.IP else "ICCID"
        return f"{what} {self.value} is also claimed by {', '.join(map(str, self.others))}"


def find_clashes(device: Device, peers: Iterable[Peer]) -> tuple[Clash, ...]:
    """The clashes of ``device`` with ``peers`` (which may include the device itself), ICCID first."""
    others: dict[Claim, set[ObjectRef]] = {}
    mine = claims(device.ip, device.iccid)
    for peer in peers:
        if peer.ref == device.ref:
            continue
        for claim in peer.claims:
            if claim in mine:
                others.setdefault(claim, set()).add(peer.ref)
    order = {IdentityKey.ICCID: 0, IdentityKey.IP: 1}
    return tuple(
        Clash(key, value, tuple(sorted(refs, key=str)))
        for (key, value), refs in sorted(others.items(), key=lambda item: order[item[0][0]])
    )


class PeerIndex:
    """All Devices of one scope by identity key: each device's peers without a scan of the rest."""

    def __init__(self, peers: Iterable[Peer] = ()) -> None:
        self._by_claim: dict[Claim, list[Peer]] = {}
        for peer in peers:
            for claim in peer.claims:
                self._by_claim.setdefault(claim, []).append(peer)

    def peers_of(self, device: Device) -> list[Peer]:
        return [p for claim in claims(device.ip, device.iccid) for p in self._by_claim.get(claim, ())]

    def clashes(self, device: Device) -> tuple[Clash, ...]:
        return find_clashes(device, self.peers_of(device))
