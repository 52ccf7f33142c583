"""Hostile bytes through the proxy's real listeners (plain and TLS) must cost only their own connection.

A seeded random run (seed in ``CC_FUZZ_SEED``, printed with any failure so a case can be replayed)
sends random bytes and mutated valid packets (truncated, huge or 5-byte remaining lengths, bad
UTF-8, U+0000, reserved flags, QoS 3, packet id 0, oversized, PUBLISH before CONNECT, a second
CONNECT) either as the first bytes of a connection or after a known device's valid CONNECT, on
both relay paths (raw for AWS, packet by packet for Azure) towards a real mosquitto; and mutated
PROXY protocol headers from a trusted balancer's address. Afterwards the
listeners must still serve a good device end to end, every connection must have been closed, and no
log record may show an exception that escaped its handler. Seeded random rather than hypothesis:
each case is a network round trip, and shrinking would replay hundreds of them.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import os
import random
import socket
import ssl
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pytest

from cloudconnector.model import EndpointType
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import (
    MQTT_5,
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Publish,
    Pubrel,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from cloudconnector.mqtt.wire import encode_varint
from cloudconnector.proxy.proxyproto import build_v1, build_v2
from cloudconnector.routes import Route
from tests.hardening.conftest import Records
from tests.proxy.conftest import Client, Pki, ProxyThread, World, client_tls, proxy_config
from tests.support.procs import wait_for

SEED = int(os.environ.get("CC_FUZZ_SEED", "7106"))
CASES = 300
MAX_PACKET = 8 * 1024
CONNECT_TIMEOUT = 1.0
# How long the proxy may take to close a connection it must refuse: its own CONNECT timeout
# (twice on TLS: handshake, then CONNECT) plus generous slack for a loaded 2-core runner.
CLOSE_BOUND = 2 * CONNECT_TIMEOUT + 8.0
MARK = "ZZZZ"  # placeholder inside strings, overwritten with hostile bytes of the same length


# ---------------------------------------------------------------- valid packets and mutations


def valid_packets(thing: str) -> list[bytes]:
    """Well-formed packets a device may send after CONNECT (both protocol levels)."""
    out = []
    for level in (4, MQTT_5):
        out += [
            codec.encode(Publish(f"{thing}/{MARK}", b"payload", 0), level),
            codec.encode(Publish(f"{thing}/{MARK}", b"payload", 1, packet_id=7), level),
            codec.encode(Publish(f"{thing}/{MARK}", b"payload", 2, packet_id=8), level),
            codec.encode(Subscribe(9, (Subscription(f"{thing}/{MARK}/#", 1),)), level),
            codec.encode(Unsubscribe(10, (f"{thing}/{MARK}",)), level),
            codec.encode(Puback(11), level),
            codec.encode(Pubrel(12), level),
            codec.encode(Pingreq(), level),
            codec.encode(Disconnect(), level),
        ]
    return out


def connect_packet(rng: random.Random) -> bytes:
    level = rng.choice((4, MQTT_5))
    return codec.encode(Connect(f"dev-{MARK}", level, username=f"u-{MARK}", password=b"pw"), level)


def _zero_packet_id(pkt: bytes) -> bytes:
    header, body = _header_and_body(pkt)
    ptype = header >> 4
    if ptype == 3 and (header >> 1) & 0x03:
        at = 2 + int.from_bytes(body[:2], "big")  # after the topic
    elif ptype in (4, 5, 6, 7, 8, 10):
        at = 0
    else:
        return pkt
    return pkt[: len(pkt) - len(body)] + body[:at] + b"\x00\x00" + body[at + 2 :]


def _header_and_body(pkt: bytes) -> tuple[int, bytes]:
    i = 1
    while pkt[i] & 0x80:
        i += 1
    return pkt[0], pkt[i + 1 :]


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[random.Random, bytes], bytes]
    fatal: bool  # the proxy's own framing checks must reject it (no help from the peer)


MUTATIONS = [
    Mutation("intact", lambda r, p: p, False),
    Mutation("truncated", lambda r, p: p[: r.randrange(1, len(p))], False),
    Mutation("huge_length", lambda r, p: bytes((p[0],)) + encode_varint(268_435_455) + p[2:], True),
    Mutation("varint_5_bytes", lambda r, p: bytes((p[0],)) + b"\xff\xff\xff\xff\x7f" + p[2:], True),
    Mutation(
        "bad_utf8",
        lambda r, p: p.replace(MARK.encode(), r.choice((b"\xff\xfe\xfd\xfc", b"\xc0\x80ab"))),
        False,
    ),
    Mutation("nul_char", lambda r, p: p.replace(MARK.encode(), b"a\x00bc"), False),
    Mutation("surrogate", lambda r, p: p.replace(MARK.encode(), b"\xed\xa0\x80a"), False),
    Mutation("zero_packet_id", lambda r, p: _zero_packet_id(p), False),
    Mutation(
        "reserved_flags",
        lambda r, p: bytes((p[0] ^ r.choice((0x01, 0x04, 0x08, 0x0F)),)) + p[1:] if p[0] >> 4 != 3 else p,
        False,  # not fatal for PUBLISH, whose low bits are real flags
    ),
    Mutation("qos_3", lambda r, p: bytes((0x36,)) + p[1:] if p[0] >> 4 == 3 else p, False),
    Mutation("type_0_or_15", lambda r, p: bytes((r.choice((0x00, 0xF0)),)) + p[1:], False),
    Mutation(
        "oversized",
        lambda r, p: codec.encode(Publish(f"t/{MARK}", b"x" * (MAX_PACKET + r.randrange(1, 5000)))),
        True,
    ),
    Mutation(
        "bit_flips",
        lambda r, p: bytes(b ^ (1 << r.randrange(8)) if r.random() < 0.1 else b for b in p),
        False,
    ),
    Mutation(
        "length_off_by_one", lambda r, p: bytes((p[0], (p[1] + r.choice((-1, 1))) & 0x7F)) + p[2:], False
    ),
    Mutation("random_bytes", lambda r, p: r.randbytes(r.randrange(1, 300)), False),
    Mutation("repeated", lambda r, p: p * r.randrange(2, 50), False),
]


@dataclass(frozen=True)
class Case:
    index: int
    tls: bool
    kind: str  # "unknown" device, or the relay path of a known one: "aws" (raw) / "azure" (packets)
    after_connect: bool
    mutation: str
    data: bytes
    fatal: bool

    def __str__(self) -> str:
        where = "after CONNECT" if self.after_connect else "first"
        return (
            f"case {self.index} (seed {SEED}): {self.mutation} {where}, {self.kind} device, "
            f"{'TLS' if self.tls else 'plain'}: {self.data[:80]!r}"
        )


def make_cases(rng: random.Random, thing_of: Callable[[str], str]) -> list[Case]:
    cases = []
    for i in range(CASES):
        tls = rng.random() < 0.3
        kind = rng.choice(("unknown", "aws", "azure"))
        after = kind != "unknown" and rng.random() < 0.6
        mutation = rng.choice(MUTATIONS)
        if after:
            # Includes a second CONNECT: out of order once a session is up.
            base = rng.choice([*valid_packets(thing_of(kind)), connect_packet(rng)])
        else:
            # Includes PUBLISH/SUBSCRIBE/... as the first packet: out of order before CONNECT.
            base = connect_packet(rng) if rng.random() < 0.6 else rng.choice(valid_packets("x"))
        data = mutation.apply(rng, base) or b"\x00"
        fatal = (
            mutation.fatal
            or (mutation.name == "qos_3" and base[0] >> 4 == 3)
            or (mutation.name == "reserved_flags" and base[0] >> 4 != 3)
            or (mutation.name == "type_0_or_15" and data[0] == 0)
        )
        cases.append(Case(i, tls, kind, after, mutation.name, data, fatal))
    # The fixed hostile openings the issue names, whatever the seed draws.
    publish_first = codec.encode(Publish("x/y", b"early", 1, packet_id=1))
    for j, data in enumerate(
        (publish_first, b"\x10\xff\xff\xff\xff\x7f", b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n")
    ):
        cases.append(Case(CASES + j, bool(j % 2), "unknown", False, "fixed", data, False))
    return cases


# ---------------------------------------------------------------- talking to the proxy


def session_started(answer: bytes) -> bool:
    """A CONNACK accepting the connection (return/reason code 0 in both protocol levels)."""
    return len(answer) >= 4 and answer[0] == 0x20 and answer[3] == 0


def closed_within(s: socket.socket, bound: float, what: object, end_session: bool = False) -> bytes:
    """Everything the proxy sends until it closes; fails if it keeps the connection open.

    With ``end_session``, a connection the proxy accepted (the bytes held a valid CONNECT) is
    ended from this side once its CONNACK is seen: only the close that follows is asserted.
    """
    s.settimeout(bound)
    out = b""
    ended = False
    while len(out) < 1 << 20:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return out  # a reset or an aborted TLS session still is a close
        except TimeoutError:
            raise AssertionError(f"not closed within {bound}s: {what}") from None
        if not chunk:
            return out
        out += chunk
        if end_session and not ended and session_started(out):
            if isinstance(s, ssl.SSLSocket):
                return out  # cannot half-close TLS: closed on return, the gauge check covers it
            s.shutdown(socket.SHUT_WR)
            ended = True
    raise AssertionError(f"endless answer: {what}")


def send_quietly(s: socket.socket, data: bytes) -> None:
    # The proxy may close as soon as it has seen enough of a bad packet.
    with contextlib.suppress(ConnectionResetError, BrokenPipeError, ssl.SSLError):
        s.sendall(data)


class Runner:
    """Opens connections to one proxy as a given device address, plain or TLS."""

    def __init__(self, pki: Pki, proxy: ProxyThread) -> None:
        self.proxy = proxy
        self.ctx = client_tls(pki, None, "")

    @contextlib.contextmanager
    def connection(self, ip: str, tls: bool) -> Iterator[socket.socket]:
        port = self.proxy.tls_port if tls else self.proxy.port
        raw = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_BOUND, source_address=(ip, 0))
        try:
            s = self.ctx.wrap_socket(raw, server_hostname="localhost") if tls else raw
        except BaseException:
            raw.close()
            raise
        with s:
            yield s

    def run(self, case: Case, ip: str) -> None:
        if case.tls and case.kind == "unknown":
            # IP mode: an address no device has is closed before the TLS handshake.
            with socket.create_connection(
                ("127.0.0.1", self.proxy.tls_port), timeout=CLOSE_BOUND, source_address=(ip, 0)
            ) as raw:
                send_quietly(raw, case.data)
                assert closed_within(raw, CLOSE_BOUND, case) == b"", f"answered {case}"
            return
        if case.tls and not case.after_connect and case.mutation == "random_bytes":
            # Garbage instead of a ClientHello: the handshake itself is the target.
            with socket.create_connection(
                ("127.0.0.1", self.proxy.tls_port), timeout=CLOSE_BOUND, source_address=(ip, 0)
            ) as raw:
                send_quietly(raw, case.data)
                closed_within(raw, CLOSE_BOUND, case)
            return
        with self.connection(ip, case.tls) as s:
            if case.after_connect:
                s.sendall(codec.encode(Connect("fuzzed")))
                assert s.recv(4) == b"\x20\x02\x00\x00", f"no session for {case}"
            send_quietly(s, case.data)
            if not case.after_connect:
                answer = closed_within(s, CLOSE_BOUND, case, end_session=case.kind != "unknown")
                # Without a session the proxy only ever answers with a CONNACK refusal.
                refused = answer[:1] == b"\x20" and answer[1:2] in (b"\x02", b"\x03")
                assert not answer or refused or session_started(answer), f"{answer!r}: {case}"
                assert case.kind != "unknown" or not session_started(answer), f"session for {case}"
            elif case.fatal:
                closed_within(s, CLOSE_BOUND, case)
            elif not case.tls:
                s.shutdown(socket.SHUT_WR)  # the rest may be incomplete yet valid: end it ourselves
                closed_within(s, CLOSE_BOUND, case)
            # A TLS socket cannot half-close; it is closed here, and the final check that every
            # connection was released covers it.


def open_connections(proxy: ProxyThread) -> float:
    return float(
        proxy.run(
            lambda: proxy.proxy.metrics.registry.get_sample_value("cloudconnector_proxy_open_connections")
        )
    )


def errors_counted(proxy: ProxyThread) -> float:
    value = proxy.run(
        lambda: proxy.proxy.metrics.registry.get_sample_value(
            "cloudconnector_proxy_connections_total", {"result": "error"}
        )
    )
    return float(value or 0.0)


# ---------------------------------------------------------------- fixtures


@dataclass
class Fleet:
    proxy: ProxyThread
    runner: Runner
    lanes: list[tuple[str, dict[str, Route]]]  # per worker: its unknown IP and its known devices


@pytest.fixture
def fleet(pki: Pki, world: World) -> Iterator[Fleet]:
    pt = ProxyThread(
        proxy_config(pki, connect_timeout=CONNECT_TIMEOUT, max_packet_size=MAX_PACKET, upstream_timeout=5.0),
        world,
    )
    try:
        lanes = []
        for lane in range(12):
            aws = world.add()
            azure = replace(world.add(), endpoint_type=EndpointType.AZURE)
            pt.run(lambda a=azure: world.directory.put(a))  # type: ignore[misc]
            lanes.append((f"127.0.200.{lane + 2}", {"aws": aws, "azure": azure}))
        yield Fleet(pt, Runner(pki, pt), lanes)
    finally:
        pt.close()


def run_lanes(fleet: Fleet, cases: list[Case]) -> None:
    """Cases spread over lanes run side by side; within a lane (one device) one at a time, so that
    no case is disturbed by the broker taking over a session of the same client."""

    def lane(n: int) -> None:
        unknown_ip, routes = fleet.lanes[n]
        for case in cases[n :: len(fleet.lanes)]:
            ip = unknown_ip if case.kind == "unknown" else routes[case.kind].ip or ""
            fleet.runner.run(case, ip)

    with ThreadPoolExecutor(len(fleet.lanes)) as pool:
        list(pool.map(lane, range(len(fleet.lanes))))


def assert_good_device_relays(world: World, proxy: ProxyThread, pki: Pki, admin: Client, tls: bool) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    dev = Client("after-the-fuzz", bind=route.ip or "", tls=client_tls(pki, None, "") if tls else None)
    try:
        assert (
            dev.connect(proxy.tls_port if tls else proxy.port, host="localhost" if tls else "127.0.0.1") == 0
        )
        dev.publish(f"{route.client_id}/up", b"still relaying", 1)
        got = admin.expect()
        assert (got.topic, got.payload) == (f"{route.client_id}/up", b"still relaying")
    finally:
        dev.close()


# ---------------------------------------------------------------- tests


def test_fuzzed_connections_cost_only_themselves(
    fleet: Fleet, world: World, pki: Pki, admin: Client, records: Records
) -> None:
    rng = random.Random(SEED)
    cases = make_cases(rng, lambda kind: fleet.lanes[0][1][kind].client_id)
    run_lanes(fleet, cases)

    for tls in (False, True):
        assert_good_device_relays(world, fleet.proxy, pki, admin, tls)
    # The good devices have disconnected too: nothing may be left open.
    wait_for(lambda: open_connections(fleet.proxy) == 0, what="every connection released")
    assert errors_counted(fleet.proxy) == 0
    gc.collect()  # a failed task that nobody awaited is only reported when it is collected
    assert records.alarms() == []
    assert any(r.name == "cloudconnector.proxy" for r in records.records)  # the watch was live


def test_memory_bounded_over_many_bad_connections(fleet: Fleet) -> None:
    rng = random.Random(SEED + 1)
    thing = fleet.lanes[0][1]["aws"].client_id

    def batch(n: int) -> list[Case]:
        picked = [c for c in make_cases(rng, lambda kind: thing) if c.fatal or not c.after_connect]
        return picked[:n]

    def settled() -> int:
        wait_for(lambda: open_connections(fleet.proxy) == 0, what="connections released")
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        run_lanes(fleet, batch(100))  # warm-up: caches, metric label children, thread pools
        before = settled()
        for _ in range(3):
            run_lanes(fleet, batch(150))
        after = settled()
    finally:
        tracemalloc.stop()
    # Generous: well under 2 KB per connection; a leaked buffer, task or socket per connection
    # would exceed it.
    assert after - before < 1_000_000, f"grew by {after - before} bytes over ~450 bad connections"


# ---------------------------------------------------------------- PROXY protocol headers

BALANCER = "127.0.250.1"


def mutated_proxy_header(rng: random.Random, device_ip: str, port: int) -> bytes:
    header = rng.choice((build_v1, build_v2))(device_ip, "127.0.0.1", rng.randrange(1, 65536), port)
    how = rng.randrange(6)
    if how == 0:
        return header[: rng.randrange(1, len(header))]  # cut short, then the CONNECT follows
    if how == 1:
        return bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.15 else b for b in header)
    if how == 2:
        return b"PROXY TCP4 " + rng.randbytes(rng.randrange(1, 200)) + b"\r\n"
    if how == 3:  # a v2 header announcing a huge or odd address block
        return header[:14] + rng.randbytes(2) + header[16:]
    if how == 4:
        return header[:12] + bytes((rng.randrange(256), rng.randrange(256))) + header[14:]
    return header


def test_fuzzed_proxy_headers_from_a_trusted_balancer(
    pki: Pki, world: World, admin: Client, records: Records
) -> None:
    nets = (ipaddress.ip_network(f"{BALANCER}/32"),)
    pt = ProxyThread(proxy_config(pki, connect_timeout=CONNECT_TIMEOUT, trusted_proxies=nets), world)
    try:
        route = world.add()
        rng = random.Random(SEED + 2)
        for n in range(120):
            header = mutated_proxy_header(rng, route.ip or "", pt.port)
            case = f"PROXY header case {n} (seed {SEED}): {header!r}"
            with socket.create_connection(("127.0.0.1", pt.port), source_address=(BALANCER, 0)) as s:
                send_quietly(s, header + codec.encode(Connect("behind-balancer")))
                answer = closed_within(s, CLOSE_BOUND, case, end_session=True)
            # Either dropped, refused (the source is unknown), or the device's own session.
            assert not answer or answer[:2] == b"\x20\x02", f"{answer!r}: {case}"
        wait_for(lambda: open_connections(pt) == 0, what="every connection released")
        assert errors_counted(pt) == 0
        gc.collect()
        assert records.alarms() == []

        # The balancer still gets a good device through, end to end.
        admin.subscribe(f"{route.client_id}/#", 1)
        header = build_v2(route.ip or "", "127.0.0.1", 40000, pt.port)
        with socket.create_connection(("127.0.0.1", pt.port), source_address=(BALANCER, 0)) as s:
            s.sendall(header + codec.encode(Connect("behind-balancer")))
            assert s.recv(4) == b"\x20\x02\x00\x00"
            s.sendall(codec.encode(Publish(f"{route.client_id}/up", b"via balancer", 1, packet_id=1)))
            got = admin.expect()
            assert (got.topic, got.payload) == (f"{route.client_id}/up", b"via balancer")
    finally:
        pt.close()
