"""Provisioning paced by the Endpoint's rate limit, not by threads or latency: whole devices are
admitted in arrival order with a bounded number in flight, AWS calls run on their own thread pool,
and throttling answers injected by the latency relay are absorbed by backoff."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest

from cloudconnector.clouds.aws_api import IotApi
from cloudconnector.ratelimit import MIN_IN_FLIGHT, RateLimiter
from cloudconnector.testing.latency_relay import LatencyRelay, path_shape
from tests.aws.conftest import FAST_RETRY, REGION, Recorder, fake_credentials, iot_inventory, make_device
from tests.support.procs import Moto


@pytest.fixture
async def slow_moto(moto: Moto) -> Any:
    """moto behind the relay: 50 ms per request, no jitter."""
    relay = await LatencyRelay(moto.url, latency=0.05, jitter=0.0).start()
    yield relay
    await relay.aclose()


async def test_admitted_devices_finish_in_arrival_order_with_a_bounded_number_in_flight() -> None:
    limiter = RateLimiter(1000.0, max_in_flight=3)
    running: list[int] = []
    most = 0
    finished: list[int] = []

    async def device(i: int) -> None:
        nonlocal most
        async with limiter.admit():
            running.append(i)
            most = max(most, len(running))
            await asyncio.sleep(0.05)
            running.remove(i)
            finished.append(i)

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(device(i)))
        await asyncio.sleep(0)  # arrival order is creation order
    await asyncio.gather(*tasks)
    assert most == 3
    assert finished == list(range(10))
    assert limiter.in_flight == 0


async def test_admission_is_paced_by_the_rate() -> None:
    limiter = RateLimiter(20.0)
    loop = asyncio.get_running_loop()
    stamps: list[float] = []

    async def device() -> None:
        async with limiter.admit():
            stamps.append(loop.time())

    await asyncio.gather(*(device() for _ in range(6)))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.04  # one token each 50 ms, the first one from the burst


async def test_a_failing_device_gives_its_slot_back() -> None:
    limiter = RateLimiter(1000.0, max_in_flight=1)
    with pytest.raises(RuntimeError):
        async with limiter.admit():
            raise RuntimeError("cloud said no")
    assert limiter.in_flight == 0
    async with asyncio.timeout(1):
        async with limiter.admit():
            assert limiter.in_flight == 1


async def test_a_device_admitted_by_its_caller_is_not_admitted_twice() -> None:
    limiter = RateLimiter(0.5, max_in_flight=1)  # a second token would take two seconds
    # The inner one is the provisioner's own admission inside the reconciler's.
    async with asyncio.timeout(1), limiter.admit(), limiter.admit():
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0
    other = asyncio.create_task(_admitted_once(limiter))
    await asyncio.sleep(0.1)
    assert not other.done()  # another device still waits for its token
    other.cancel()


async def _admitted_once(limiter: RateLimiter) -> None:
    async with limiter.admit():
        pass


async def test_devices_in_flight_follow_rate_times_measured_device_time() -> None:
    limiter = RateLimiter(40.0, first_guess=0.0)
    assert limiter.in_flight_limit == MIN_IN_FLIGHT
    limiter = RateLimiter(1000.0)
    for _ in range(5):
        async with limiter.admit():
            await asyncio.sleep(0.1)
    limiter.set_rate(40.0)
    # 40/s x ~0.1 s x headroom 2 + 1: enough devices in flight to keep the rate up.
    assert 9 <= limiter.in_flight_limit <= 12
    limiter.set_rate(400.0)
    assert limiter.in_flight_limit >= 80
    assert RateLimiter(1e6, max_in_flight=50, first_guess=5.0).in_flight_limit == 50


async def test_a_slow_stretch_does_not_fill_the_pipeline() -> None:
    """Devices that take long because the machine cannot keep up would only wait longer if more
    were let in: the bound follows the fastest device time, not the typical one."""
    limiter = RateLimiter(1000.0)
    for _ in range(3):
        async with limiter.admit():
            await asyncio.sleep(0.05)
    fast = limiter.in_flight_limit
    for _ in range(5):
        async with limiter.admit():
            await asyncio.sleep(0.2)
    assert limiter.in_flight_limit <= fast * 1.2
    with pytest.raises(RuntimeError):
        async with limiter.admit():
            raise RuntimeError("failed at once")
    assert limiter.in_flight_limit >= fast * 0.9  # a failure is not a fast device


async def test_cloud_calls_run_together_on_their_own_threads(slow_moto: LatencyRelay) -> None:
    api = IotApi(REGION, fake_credentials(), endpoint_url=slow_moto.url, retry=FAST_RETRY)
    seen: set[str] = set()
    method = api._client.describe_endpoint

    def spy(**params: Any) -> Any:
        seen.add(threading.current_thread().name)
        return method(**params)

    api._client.describe_endpoint = spy
    try:
        await asyncio.gather(*(api.call("describe_endpoint", endpointType="iot:Data-ATS") for _ in range(24)))
    finally:
        api.close()
    assert seen and all(name.startswith("aws-call") for name in seen)
    # asyncio's default pool (min(32, cores + 4) threads) would hold this to 6 on two cores.
    assert slow_moto.stats.max_in_flight >= 20
    assert slow_moto.stats.requests["GET /endpoint"] == 24


async def test_injected_throttling_is_retried_and_never_fails_a_device(
    moto: Moto, make_provisioner: Any, keys: Any, iot: Any, namespace: str
) -> None:
    relay = await LatencyRelay(moto.url, latency=0.0, jitter=0.0, throttle_share=0.3, seed=7).start()
    try:
        prov = make_provisioner(relay.url)
        devices = [make_device(namespace, i) for i in range(4)]
        await asyncio.gather(*(prov.provision(d, {}, Recorder(), keys) for d in devices))
    finally:
        await relay.aclose()
    assert sum(relay.stats.throttled.values()) > 0
    inv = iot_inventory(iot)
    assert inv["things"] == sorted(d.cloud_id for d in devices)
    assert sorted(inv["certs"].values()) == ["ACTIVE"] * 4  # no stray certificate from a retry


async def test_devices_become_ready_progressively_not_in_lockstep(
    slow_moto: LatencyRelay, make_provisioner: Any, keys: Any, namespace: str
) -> None:
    # 30 devices at 10/s take 2.9 s to admit; one device's 7 calls take ~0.4 s at 50 ms each.
    prov = make_provisioner(slow_moto.url, rate=10.0)
    await prov.provision(make_device(namespace, 99), {}, Recorder(), keys)  # moto's first-use set-up
    loop = asyncio.get_running_loop()
    admitted: list[float] = []
    done: dict[int, float] = {}

    async def device(i: int) -> None:
        await prov.provision(make_device(namespace, i), {}, Recorder(), keys)
        done[i] = loop.time()

    original = prov._limiter.admit

    def admit() -> Any:
        class Stamped:
            async def __aenter__(self) -> None:
                self._inner = original()
                await self._inner.__aenter__()
                admitted.append(loop.time())

            async def __aexit__(self, *exc: Any) -> Any:
                return await self._inner.__aexit__(*exc)

        return Stamped()

    prov._limiter.admit = admit
    tasks = []
    for i in range(30):
        tasks.append(asyncio.create_task(device(i)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    rank = {i: r for r, i in enumerate(sorted(done, key=done.__getitem__))}
    # In lockstep every device would finish after the last one was admitted, all near the end.
    assert min(done.values()) < admitted[-1], "no device was Ready before the last one started"
    first, last = range(10), range(20, 30)
    assert sum(rank[i] for i in first) < sum(rank[i] for i in last), rank  # in arrival order


async def test_the_relay_keeps_the_clients_connection_when_moto_closes_its_own(
    slow_moto: LatencyRelay,
) -> None:
    """moto answers every request with ``Connection: close``; a cloud front end keeps the
    connection, so the relay does too (the operator's side then costs what it would against AWS)."""
    api = IotApi(REGION, fake_credentials(), endpoint_url=slow_moto.url, retry=FAST_RETRY)
    try:
        for _ in range(5):
            await api.call("describe_endpoint", endpointType="iot:Data-ATS")
    finally:
        api.close()
    assert slow_moto.stats.requests["GET /endpoint"] == 5
    assert slow_moto.stats.connections == 1


def test_request_shapes_name_the_operation_not_the_object() -> None:
    assert path_shape("PUT", "/things/ns_meter-1/principals") == "PUT /things/*/principals"
    assert path_shape("POST", "/things/ns_meter-1") == "POST /things"
    assert path_shape("PUT", "/certificates/abc?newStatus=ACTIVE") == "PUT /certificates"
    assert path_shape("POST", "/v1/transit/encrypt/cc-ns.meter-1") == "POST /v1/transit/encrypt"
