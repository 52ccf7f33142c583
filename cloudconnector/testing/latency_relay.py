"""An HTTP/1.1 relay that makes a local server look like a distant cloud: every request waits a
configurable latency (with jitter) before it is forwarded, a share of them can be refused with
AWS's ``ThrottlingException`` answer (never reaching the server, as AWS refuses before it acts),
and every request is counted by method and path shape.

Used by ``bench/provision_real.py`` in front of moto (latency, throttling) and OpenBao (counting
only), and by tests that prove backoff. Plain HTTP only; one upstream connection per client
connection, so keep-alive on both sides behaves as it would through a real network.

Command line: ``python -m cloudconnector.testing.latency_relay UPSTREAM_URL [--latency 0.15]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

THROTTLE_BODY = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
_HEAD_LIMIT = 1 << 20
_CLOSE = re.compile(rb"(?im)^connection:[ \t]*close(?=[ \t]*\r?$)")
NO_BODY_STATUS = (204, 304)


def path_shape(method: str, target: str) -> str:
    """``PUT /things/meter-1/principals?x=1`` -> ``PUT /things/*/principals``: the operation, not the id.

    Vault paths keep three segments (``/v1/transit/encrypt``), the rest their first segment and any
    literal third one, which is how AWS IoT's REST paths name sub-resources.
    """
    parts = [p for p in target.split("?", 1)[0].split("/") if p]
    if parts[:1] == ["v1"]:
        return f"{method} /" + "/".join(parts[:3])
    shape = "/" + "/".join(parts[:1])
    if len(parts) >= 3:
        shape += f"/*/{parts[2]}"
    return f"{method} {shape}"


@dataclass
class RelayStats:
    """What passed through; safe to read from another thread (counters are only ever added to)."""

    requests: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    in_flight: int = 0
    max_in_flight: int = 0  # most requests waiting for their answer at the same moment

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def writes(self) -> int:
        """Requests that may change something (anything but GET, HEAD and LIST)."""
        return sum(n for k, n in self.requests.items() if k.split(" ", 1)[0] not in ("GET", "HEAD", "LIST"))

    def snapshot(self) -> Counter[str]:
        return Counter(dict(self.requests))


class _Closed(Exception):
    """The peer closed the connection between requests."""


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            raise _Closed from None
        raise
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return head, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], *, until_eof: bool) -> bytes:
    """The body exactly as framed on the wire (chunked bodies keep their framing)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            out += line
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = await reader.readuntil(b"\r\n")
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if until_eof else b""


class LatencyRelay:
    """Listens on ``listen_host:listen_port`` (0: any free port) and relays to ``upstream``."""

    def __init__(
        self,
        upstream: str,
        *,
        latency: float = 0.15,
        jitter: float = 0.03,
        throttle_share: float = 0.0,
        seed: int | None = None,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        classify: Callable[[str, str], str] = path_shape,
    ) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError("the relay forwards plain http:// only")
        self.upstream_host = split.hostname
        self.upstream_port = split.port or 80
        self.latency = latency
        self.jitter = jitter
        self.throttle_share = throttle_share
        self.stats = RelayStats()
        self._random = random.Random(seed)  # noqa: S311 - jitter and sampling, not security
        self._listen = (listen_host, listen_port)
        self._classify = classify
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._listen[0]}:{self.port}"

    async def start(self) -> LatencyRelay:
        self._server = await asyncio.start_server(self._serve, *self._listen, limit=_HEAD_LIMIT)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the connections ends their tasks (cancelling them instead makes asyncio's
        # stream callback log each CancelledError); a task still busy after a second is cancelled.
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()

    def _delay(self) -> float:
        return max(0.0, self.latency + self._random.uniform(-self.jitter, self.jitter))

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.stats.connections += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head, headers = await _read_message(client_r)
                except _Closed:
                    return
                body = await _read_body(client_r, headers, until_eof=False)
                method, target = head.split(b" ", 2)[:2]
                key = self._classify(method.decode(), target.decode("latin-1"))
                self.stats.requests[key] += 1
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
                try:
                    keep, upstream = await self._answer(client_w, upstream, method, head + body, key)
                finally:
                    self.stats.in_flight -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, _Closed):
            return
        finally:
            self._tasks.discard(task)
            self._writers.discard(client_w)
            if upstream is not None:
                upstream[1].close()
            client_w.close()

    async def _answer(
        self,
        client_w: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
        method: bytes,
        request: bytes,
        key: str,
    ) -> tuple[bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """Answer one request; returns whether the client's connection stays open, and the
        upstream connection to reuse for its next request."""
        await asyncio.sleep(self._delay())
        if self.throttle_share and self._random.random() < self.throttle_share:
            self.stats.throttled[key] += 1
            client_w.write(_throttle_answer())
            await client_w.drain()
            return True, upstream
        if upstream is None:
            upstream = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=_HEAD_LIMIT
            )
        up_r, up_w = upstream
        up_w.write(request)
        await up_w.drain()
        resp_head, resp_headers = await _read_message(up_r)
        status = int(resp_head.split(b" ", 2)[1])
        no_body = method == b"HEAD" or status in NO_BODY_STATUS or 100 <= status < 200
        resp_body = b"" if no_body else await _read_body(up_r, resp_headers, until_eof=True)
        delimited = (
            no_body
            or "content-length" in resp_headers
            or "chunked" in resp_headers.get("transfer-encoding", "").lower()
        )
        if resp_headers.get("connection", "").lower() == "close" or not delimited:
            # The local server closes after each answer (moto's does); a cloud front end keeps the
            # connection, so the client's side stays open and the next request reconnects upstream.
            up_w.close()
            upstream = None
            if delimited:
                resp_head = _CLOSE.sub(b"Connection: keep-alive", resp_head)
        client_w.write(resp_head + resp_body)
        await client_w.drain()
        return delimited, upstream


def _throttle_answer() -> bytes:
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "Content-Type: application/json\r\n"
        "x-amzn-ErrorType: ThrottlingException\r\n"
        f"Content-Length: {len(THROTTLE_BODY)}\r\n"
        "\r\n"
    )
    return head.encode() + THROTTLE_BODY


@contextlib.contextmanager
def relay_in_thread(upstream: str, **options: object) -> Iterator[LatencyRelay]:
    """Run a relay on an event loop of its own in a daemon thread (for synchronous callers, and so
    that the caller's own loop being busy never adds to the latency it injects)."""
    loop = asyncio.new_event_loop()
    relay = LatencyRelay(upstream, **options)  # type: ignore[arg-type]
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(relay.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(relay.aclose())
        loop.close()

    thread = threading.Thread(target=run, name="latency-relay", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the latency relay did not start")
    try:
        yield relay
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="http://host:port of the server to relay to")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.15, help="seconds added to each request")
    parser.add_argument("--jitter", type=float, default=0.03, help="+/- seconds around the latency")
    parser.add_argument("--throttle", type=float, default=0.0, help="share of requests refused as throttled")
    args = parser.parse_args(argv)
    relay = LatencyRelay(
        args.upstream,
        latency=args.latency,
        jitter=args.jitter,
        throttle_share=args.throttle,
        listen_port=args.port,
    )

    async def serve() -> None:
        await relay.start()
        print(f"relaying {relay.url} -> {args.upstream}", flush=True)
        started = time.monotonic()
        try:
            await asyncio.Event().wait()
        finally:
            await relay.aclose()
            print(f"{relay.stats.total} requests in {time.monotonic() - started:.0f} s", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
