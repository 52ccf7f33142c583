"""The in-memory directory: lookups, address spellings, and which changes end a live session."""

from __future__ import annotations

from dataclasses import replace

from cloudconnector.model import EndpointType, ObjectRef
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.routes import Route


def route(name: str, ip: str | None, iccid: str, cert: str = "c1") -> Route:
    return Route(ObjectRef("ns", name), iccid, None, ip, EndpointType.AWS, "h", 8883, None, f"t-{name}", cert)


def test_lookups_and_spellings() -> None:
    a, b = route("a", "10.0.0.1", "111111111111111111"), route("b", "2001:db8::1", "222222222222222222")
    d = StaticDirectory([a, b])
    assert d.by_ip("10.0.0.1") == a and d.by_ip("::ffff:10.0.0.1") == a
    assert d.by_ip("2001:0db8:0000::1") == b and d.by_ip("not an address") is None
    assert d.by_iccid("222222222222222222") == b and d.by_iccid("3") is None


def test_changes_that_end_sessions() -> None:
    a = route("a", "10.0.0.1", "111111111111111111")
    d = StaticDirectory([a])
    revoked: list[ObjectRef] = []
    d.subscribe(revoked.append)
    d.put(replace(a, ip="10.0.0.9"))  # a new address: new connections only
    assert revoked == [] and d.by_ip("10.0.0.1") is None and d.by_ip("10.0.0.9") is not None
    d.put(replace(a, ip="10.0.0.9", certificate_id="c2"))  # rotation
    d.put(replace(a, ip="10.0.0.9", certificate_id="c2", host="other"))  # moved
    d.remove(a.device)
    d.remove(a.device)  # twice: nothing left to revoke
    assert revoked == [a.device] * 3
    assert d.by_iccid(a.iccid) is None


def test_replace_revokes_only_what_changed() -> None:
    a, b, c = (route(n, f"10.0.0.{i}", f"33333333333333333{i}") for i, n in enumerate("abc"))
    d = StaticDirectory([a, b, c])
    revoked: list[ObjectRef] = []
    d.subscribe(revoked.append)
    d.replace([a, replace(b, certificate_id="c2")])
    assert sorted(r.name for r in revoked) == ["b", "c"]


def test_shared_address_does_not_drop_the_other_device() -> None:
    # Two devices claiming one address is a conflict the operator reports; the index must at
    # least not lose the remaining one when the other goes away.
    a, b = route("a", "10.0.0.1", "444444444444444444"), route("b", "10.0.0.1", "555555555555555555")
    d = StaticDirectory([a])
    d.put(b)
    d.remove(a.device)
    assert d.by_ip("10.0.0.1") == b
