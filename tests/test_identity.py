"""One identity, one home: the canonical address, the scope, clashes across namespaces, and the
proxy's index refusing a key that two devices claim (fast: no services)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cloudconnector.core.conflicts import Peer, PeerIndex, find_clashes
from cloudconnector.errors import InvalidSpec
from cloudconnector.identity import IdentityKey, Scope, canonical_ip, claims
from cloudconnector.model import EndpointType, ObjectRef, parse_device
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.routes import AmbiguousIdentity, Route, build_route


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.64.0.17", "10.64.0.17"),
        ("::ffff:10.64.0.17", "10.64.0.17"),
        ("::FFFF:0a40:0011", "10.64.0.17"),
        ("2001:0DB8:0000::0001", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::10.64.0.17", "::a40:11"),  # IPv4-compatible (deprecated) is not a mapped address
    ],
)
def test_canonical_ip(text: str, canonical: str) -> None:
    assert canonical_ip(text) == canonical


def test_canonical_ip_refuses_non_addresses() -> None:
    with pytest.raises(ValueError):
        canonical_ip("10.64.0.256")


def test_model_ip_is_canonical() -> None:
    def device(ip: str) -> str | None:
        spec = {"group": "g", "sim": {"iccid": "893530000000000001"}, "ip": ip}
        return parse_device({"metadata": {"name": "d", "namespace": "n"}, "spec": spec}).ip

    assert device("::ffff:10.64.0.17") == device("10.64.0.17") == "10.64.0.17"
    with pytest.raises(InvalidSpec, match=r"spec\.ip"):
        device("not-an-address")


def test_claims() -> None:
    assert claims("::ffff:10.0.0.1", "8935") == ((IdentityKey.IP, "10.0.0.1"), (IdentityKey.ICCID, "8935"))
    assert claims(None, "8935") == ((IdentityKey.ICCID, "8935"),)


def test_scope() -> None:
    everywhere = Scope.parse("")
    assert everywhere.cluster_wide and everywhere.covers("tenant-a") and everywhere.single_namespace is None
    one = Scope.parse("tenant-a")
    assert one.single_namespace == "tenant-a" and not one.covers("tenant-b")
    some = Scope.parse(" tenant-a , fleet-* ")
    assert some.single_namespace is None and not some.cluster_wide
    assert some.covers("tenant-a") and some.covers("fleet-7") and not some.covers("tenant-b")
    but = Scope.parse("!kube-*")
    assert but.cluster_wide and but.covers("tenant-a") and not but.covers("kube-system")
    assert str(everywhere) == "all namespaces" and str(some) == "tenant-a,fleet-*"


def _device(ns: str, name: str, ip: str | None, iccid: str):  # type: ignore[no-untyped-def]
    spec: dict[str, object] = {"group": "g", "sim": {"iccid": iccid}}
    if ip:
        spec["ip"] = ip
    return parse_device({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def test_clashes_cross_namespaces_and_spellings() -> None:
    mine = _device("tenant-a", "meter", "10.64.0.17", "893530000000000001")
    same_name_elsewhere = Peer(ObjectRef("tenant-b", "meter"), "::ffff:10.64.0.17", "893530000000000009")
    sim_twin = Peer(ObjectRef("tenant-c", "copy"), "10.64.0.99", "893530000000000001")
    me = Peer.of(mine)
    clashes = find_clashes(mine, [me, same_name_elsewhere, sim_twin])
    assert [(c.field, c.value, c.others) for c in clashes] == [
        (IdentityKey.ICCID, "893530000000000001", (ObjectRef("tenant-c", "copy"),)),
        (IdentityKey.IP, "10.64.0.17", (ObjectRef("tenant-b", "meter"),)),
    ]
    assert clashes[0].reason == "DuplicateIccid" and clashes[1].reason == "DuplicateIp"
    assert clashes[1].describe() == "IP address 10.64.0.17 is also claimed by tenant-b/meter"
    # Its own entry never clashes, even with a device of the same name in another namespace.
    assert find_clashes(mine, [me]) == ()


def test_peer_index_matches_the_scan() -> None:
    devices = [
        _device("a", "one", "10.0.0.1", "893530000000000001"),
        _device("b", "two", "::ffff:10.0.0.1", "893530000000000002"),
        _device("c", "three", None, "893530000000000002"),
        _device("c", "four", "10.0.0.4", "893530000000000004"),
    ]
    peers = [Peer.of(d) for d in devices]
    index = PeerIndex(peers)
    for device in devices:
        assert index.clashes(device) == find_clashes(device, peers)
    assert [len(index.clashes(d)) for d in devices] == [1, 2, 1, 0]


def route(ns: str, name: str, ip: str | None, iccid: str, cert: str = "c1") -> Route:
    return Route(ObjectRef(ns, name), iccid, None, ip, EndpointType.AWS, "h", 8883, None, f"t-{name}", cert)


def test_directory_refuses_an_ip_two_namespaces_claim() -> None:
    a = route("tenant-a", "meter", "10.64.0.17", "893530000000000001")
    b = route("tenant-b", "meter", "::ffff:10.64.0.17", "893530000000000002")
    d = StaticDirectory([a])
    revoked: list[ObjectRef] = []
    d.subscribe(revoked.append)
    assert d.by_ip("::ffff:10.64.0.17") == a
    d.put(b)
    assert sorted(revoked, key=str) == [a.device, b.device]  # a's live session ends too
    for spelling in ("10.64.0.17", "::ffff:10.64.0.17"):
        with pytest.raises(AmbiguousIdentity) as caught:
            d.by_ip(spelling)
        assert caught.value.claimants == (a.device, b.device)
    assert d.by_iccid(a.iccid) == a  # the ICCIDs differ: that key is still unambiguous
    assert d.ambiguous() == {(IdentityKey.IP, "10.64.0.17"): (a.device, b.device)}
    revoked.clear()
    d.put(replace(b, certificate_id="c1"))  # an unrelated update: nothing newly ambiguous
    assert revoked == []
    d.remove(b.device)
    assert d.by_ip("10.64.0.17") == a and d.ambiguous() == {}


def test_directory_refuses_a_shared_iccid_and_replace_revokes() -> None:
    a = route("tenant-a", "x", "10.0.0.1", "893530000000000001")
    b = route("tenant-b", "y", "10.0.0.2", "893530000000000001")
    d = StaticDirectory([a])
    revoked: list[ObjectRef] = []
    d.subscribe(revoked.append)
    d.replace([a, b])
    assert sorted(revoked, key=str) == [a.device, b.device]
    with pytest.raises(AmbiguousIdentity):
        d.by_iccid("893530000000000001")
    # The same directory built at once refuses the same way (no "last one wins").
    with pytest.raises(AmbiguousIdentity):
        StaticDirectory([b, a]).by_iccid("893530000000000001")
    revoked.clear()
    d.replace([b])
    assert revoked == [a.device] and d.by_iccid("893530000000000001") == b


def test_route_carries_the_recorded_key_location() -> None:
    device = {
        "metadata": {"name": "meter", "namespace": "tenant-a"},
        "spec": {"group": "g", "sim": {"iccid": "893530000000000001"}, "ip": "::ffff:10.0.0.1"},
        "status": {
            "phase": "Ready",
            "endpoint": "aws",
            "cloudId": "thing",
            "certificateId": "c1",
            "keyLocation": "vault:secret/elsewhere/tenant-a/meter",
        },
    }
    group = {"metadata": {"name": "g", "namespace": "tenant-a"}, "spec": {"endpointRef": {"name": "aws"}}}
    endpoint = {
        "metadata": {"name": "aws", "namespace": "tenant-a"},
        "spec": {"type": "AwsIotCore", "aws": {"region": "eu-west-1", "dataEndpoint": "iot.example"}},
        "status": {"phase": "Ready"},
    }
    found = build_route(device, group, endpoint)
    assert found is not None
    assert found.key_location == "vault:secret/elsewhere/tenant-a/meter" and found.ip == "10.0.0.1"
    del device["status"]["keyLocation"]  # type: ignore[attr-defined]
    assert (found := build_route(device, group, endpoint)) is not None and found.key_location is None


def test_three_claimants_leave_one_by_one() -> None:
    a, b, c = (route(ns, "m", "10.0.0.7", f"89353000000000000{i}") for i, ns in enumerate("abc"))
    d = StaticDirectory([a, b])
    revoked: list[ObjectRef] = []
    d.subscribe(revoked.append)
    d.put(c)  # a third claimant: every one of them is refused and its session ended
    assert sorted(revoked, key=str) == [a.device, b.device, c.device]
    d.remove(a.device)
    with pytest.raises(AmbiguousIdentity) as caught:
        d.by_ip("10.0.0.7")
    assert caught.value.claimants == (b.device, c.device)
    d.remove(b.device)
    assert d.by_ip("10.0.0.7") == c and d.ambiguous() == {}
    d.put(replace(c, ip="10.0.0.8"))  # moving away frees the old address entirely
    assert d.by_ip("10.0.0.7") is None and d.by_ip("10.0.0.8") == d.get(c.device)
