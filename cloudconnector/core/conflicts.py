"""Two Devices claiming the same SIM (ICCID) or the same IP address in one namespace.

The proxy identifies a device by its source IP or its ICCID, so a duplicate would let one device
speak with the other's cloud identity. The rule, applied symmetrically:

* every Device in a clash gets the ``Conflict`` condition and phase ``Conflict``;
* none of them is provisioned while the clash lasts, and none is routed (the proxy only routes
  phase ``Ready``);
* a Device that already had an identity before the clash appeared (normally the older one) keeps
  it untouched — nothing is deprovisioned — and returns to ``Ready`` once the clash is resolved;
  the newcomer is never given anyone's identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cloudconnector.model import Device


@dataclass(frozen=True)
class Peer:
    """What the conflict check needs to know about another Device in the namespace."""

    name: str
    ip: str | None
    iccid: str


@dataclass(frozen=True)
class Clash:
    field: str  # "ip" or "iccid"
    value: str
    others: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "DuplicateIp" if self.field == "ip" else "DuplicateIccid"

    def describe(self) -> str:
        what = "IP address" if self.field == "ip" else "ICCID"
        return f"{what} {self.value} is also claimed by {', '.join(self.others)}"


def find_clashes(device: Device, peers: Iterable[Peer]) -> tuple[Clash, ...]:
    """The clashes of ``device`` with ``peers`` (which may include the device itself)."""
    by_ip: list[str] = []
    by_iccid: list[str] = []
    for peer in peers:
        if peer.name == device.ref.name:
            continue
        if device.ip is not None and peer.ip == device.ip:
            by_ip.append(peer.name)
        if peer.iccid == device.iccid:
            by_iccid.append(peer.name)
    clashes = []
    if by_iccid:
        clashes.append(Clash("iccid", device.iccid, tuple(sorted(set(by_iccid)))))
    if by_ip and device.ip is not None:
        clashes.append(Clash("ip", device.ip, tuple(sorted(set(by_ip)))))
    return tuple(clashes)
