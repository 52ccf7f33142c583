"""A real HTTP reverse proxy in front of an AWS emulator that can answer with AWS errors.

Tests point boto3 at the proxy instead of moto. The proxy forwards each request unchanged and
records when it arrived, or, when a fault is armed, answers instead of the upstream with the error
AWS's JSON protocols send: the status, an ``x-amzn-ErrorType`` header naming the error, an
``x-amzn-RequestId`` and a ``{"message": ...}`` body. That is what botocore parses on the wire.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from aiohttp import web

# Hop-by-hop and framing headers are recomputed by each side of the proxy.
_SKIP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


@dataclass(frozen=True)
class Fault:
    status: int
    code: str
    message: str


# IoT's service model gives ThrottlingException status 400; some AWS front ends send 429.
THROTTLING = Fault(400, "ThrottlingException", "Rate exceeded")
THROTTLING_429 = Fault(429, "ThrottlingException", "Rate exceeded")
UNRECOGNIZED_CLIENT = Fault(
    403, "UnrecognizedClientException", "The security token included in the request is invalid."
)
EXPIRED_TOKEN = Fault(403, "ExpiredTokenException", "The security token included in the request is expired")
SERVICE_UNAVAILABLE = Fault(503, "ServiceUnavailableException", "Service Unavailable")
INTERNAL_FAILURE = Fault(500, "InternalFailureException", "An unexpected error has occurred")


@dataclass(frozen=True)
class Seen:
    """One request as it reached the proxy (``at`` is ``time.monotonic()``)."""

    at: float
    method: str
    path: str
    status: int
    faulted: bool


@dataclass
class FaultPlan:
    """Which requests get ``fault``: the first ``first`` ones, then a ``fraction`` of the rest.

    ``path`` limits the plan to requests whose path starts with it. ``after_upstream`` forwards the
    request first and replaces the answer: the call took effect but the client never learns it.
    """

    fault: Fault | None = None
    first: int = 0
    fraction: float = 0.0
    seed: int = 7
    path: str = "/"
    after_upstream: bool = False
    _rng: random.Random = field(init=False, repr=False)
    _faulted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def pick(self, path: str) -> Fault | None:
        if self.fault is None or not path.startswith(self.path):
            return None
        if self._faulted < self.first or self._rng.random() < self.fraction:
            self._faulted += 1
            return self.fault
        return None


class FaultProxy:
    """``async with FaultProxy(moto.url) as proxy:`` then use ``proxy.url`` as ``endpoint_url``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.plan = FaultPlan()
        self.seen: list[Seen] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def arm(
        self,
        fault: Fault,
        *,
        first: int = 0,
        fraction: float = 0.0,
        seed: int = 7,
        path: str = "/",
        after_upstream: bool = False,
    ) -> None:
        self.plan = FaultPlan(fault, first, fraction, seed, path, after_upstream)

    def disarm(self) -> None:
        self.plan = FaultPlan()

    @property
    def faulted(self) -> int:
        return sum(1 for s in self.seen if s.faulted)

    async def __aenter__(self) -> FaultProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        body = await request.read()
        fault = self.plan.pick(request.path)
        if fault is not None and not self.plan.after_upstream:
            self.seen.append(Seen(arrived, request.method, request.path, fault.status, True))
            return _error(fault)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIP}
        if fault is not None:  # done upstream, answer lost
            self.seen.append(Seen(arrived, request.method, request.path, fault.status, True))
            return _error(fault)
        self.seen.append(Seen(arrived, request.method, request.path, upstream.status, False))
        return web.Response(status=upstream.status, body=payload, headers=out)


def _error(fault: Fault) -> web.Response:
    return web.Response(
        status=fault.status,
        body=json.dumps({"message": fault.message}).encode(),
        headers={
            "Content-Type": "application/json",
            "x-amzn-ErrorType": f"{fault.code}:http://internal.amazon.com/coral/com.amazon.iot/",
            "x-amzn-RequestId": str(uuid.uuid4()),
        },
    )
