"""How a device is recognised, and across which namespaces that recognition must be unambiguous.

The proxy tells devices apart by their source IP address or their ICCID. Both are claims a Device
makes in its spec, so the rule that keeps one tenant from speaking with another's cloud identity is:
**every identity key is claimed by at most one Device across the scope one proxy serves**. That
scope is declared here (:class:`Scope`) and nowhere else; the operator and the standalone reconciler
report every Device of a clash as ``Conflict`` across it, and the proxy refuses an identity that is
claimed twice in its index instead of picking one.

An address has one canonical spelling (:func:`canonical_ip`) used by the model, the operator's
indexes, the standalone store and the proxy alike, so ``::ffff:10.64.0.17`` and ``10.64.0.17`` are
the same claim everywhere.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


class IdentityKey(enum.StrEnum):
    """The kinds of identity a device can be recognised by (a future one is added here)."""

    IP = "ip"
    ICCID = "iccid"


Claim = tuple[IdentityKey, str]


def canonical_ip(text: str) -> str:
    """The one spelling of an address; raises ``ValueError`` for text that is not one.

    IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is the IPv4 address a dual-stack socket reports for an
    IPv4 peer, so it folds to that IPv4 address; IPv6 is written compressed and lower case; a zone
    (``%eth0``) names the proxy's interface, not the device, and is dropped.
    """
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def claims(ip: str | None, iccid: str | None) -> tuple[Claim, ...]:
    """The identity keys a device with this address and ICCID claims (the address canonical)."""
    found: list[Claim] = []
    if ip:
        try:
            found.append((IdentityKey.IP, canonical_ip(ip)))
        except ValueError:
            found.append((IdentityKey.IP, ip))  # refused by the parser; still compared as written
    if iccid:
        found.append((IdentityKey.ICCID, iccid))
    return tuple(found)


@dataclass(frozen=True)
class Scope:
    """The namespaces one proxy serves: where every identity key must be claimed at most once.

    Written like the operator's ``CLOUDCONNECTOR_NAMESPACES`` and the proxy's ``--namespace``: a
    comma-separated list of names or globs, ``!pattern`` to leave namespaces out; empty means the
    whole cluster (the chart's default). The operator and the proxy of one installation are given
    the same list, so the operator checks conflicts exactly where the proxy looks devices up.
    """

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | Iterable[str] | None) -> Scope:
        parts = text.split(",") if isinstance(text, str) else list(text or ())
        return cls(tuple(p.strip() for p in parts if p.strip()))

    @property
    def _included(self) -> tuple[str, ...]:
        return tuple(p for p in self.patterns if not p.startswith("!"))

    @property
    def _excluded(self) -> tuple[str, ...]:
        return tuple(p[1:] for p in self.patterns if p.startswith("!"))

    @property
    def cluster_wide(self) -> bool:
        return not self._included

    @property
    def single_namespace(self) -> str | None:
        """The one namespace to list and watch, if the scope is exactly one plain name."""
        names = self._included
        if len(names) == 1 and not self._excluded and not any(c in names[0] for c in "*?["):
            return names[0]
        return None

    def covers(self, namespace: str) -> bool:
        if any(fnmatch.fnmatchcase(namespace, p) for p in self._excluded):
            return False
        return self.cluster_wide or any(fnmatch.fnmatchcase(namespace, p) for p in self._included)

    def __str__(self) -> str:
        return ",".join(self.patterns) if self.patterns else "all namespaces"
