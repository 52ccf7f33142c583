"""One port served by N worker processes: a parent that keeps the directory, workers that relay.

Python relays on one core per process, so the proxy uses more cores by running N processes on the
same ports (``SO_REUSEPORT``: the kernel spreads new connections over the listening sockets by a
hash of their addresses). N is ``CC_PROXY_WORKERS`` / ``--workers``; unset (or ``auto``), the
cores this process may use: the cgroup CPU quota (v2 ``cpu.max``, v1 ``cfs_quota_us``) and the
CPU affinity mask, whichever is smaller, at least 1. N = 1 runs today's single process and none
of this module.

The design: **the parent keeps the one directory source, workers get routes over a socket.**

- The parent (``cloud-connector-proxy``'s, or ``cloud-connector run``'s process) runs the
  Kubernetes watch or the standalone reconciler, exactly as with one process, into a
  :class:`PublishingDirectory`. Every route change (put, remove, replace) is pickled and written
  to each worker over a Unix socket pair; a new worker first gets the whole table. So a pod keeps
  one watch of each resource whatever N is, and the Device objects (the larger part of the
  directory's memory) are held once, in the parent. Each worker holds only the routes (its own
  :class:`~cloudconnector.proxy.directory.StaticDirectory`, which also ends live sessions on
  revocation and refuses ambiguous identities, as in one process); CA certificates, the same for
  every device of an Endpoint, are shared within a worker.
- The parent binds the listening sockets: first a plain bind that fails in one line when the port
  is taken (so a second proxy on the same port is still refused, not silently load-shared), then N
  sockets with ``SO_REUSEPORT``, one handed to each worker. The parent keeps its copies, so a
  worker's socket outlives the worker: connections the kernel hashes to it while it restarts
  wait in its queue for the replacement instead of being reset.
- Workers read credentials themselves (Vault with the proxy's token, or the embedded key store's
  file), so a fetch never crosses the parent.
- Supervision: a worker that exits is logged with its exit code and started again (backoff from
  0.5 s, doubling to 10 s while it keeps failing within a minute); a worker that cannot start
  (port, settings: exit code 2) before any worker served ends the whole process with that error.
  SIGTERM (and SIGINT) in the parent: not ready, then each worker drains its sessions over
  ``CC_PROXY_DRAIN_SECONDS``; workers also drain when the parent's socket closes (the parent died).
- Limits of the pod are split: each worker gets 1/N of ``MAX_CONNECTIONS``,
  ``MAX_UNIDENTIFIED_BYTES`` and ``STATUS_WRITES_PER_SECOND``.
- Health and metrics: one HTTP port, served by the parent. ``/metrics`` asks every worker for its
  registry and sums the samples of equal name and labels (counters, gauges, histogram buckets;
  a restarted worker's counters start again at zero, which Prometheus reads as a counter reset),
  and adds per-worker families: ``cloudconnector_proxy_worker_info{worker,pid}``,
  ``cloudconnector_proxy_worker_connections{worker}`` (its connection attempts),
  ``cloudconnector_proxy_worker_sessions{worker}`` (its relaying sessions) and
  ``cloudconnector_proxy_worker_restarts{worker}``. ``/readyz`` is ready when the directory has
  listed and every worker listens; not while one restarts, nor during the drain.
- Live connection status (``presence.py``): each worker keeps its own sessions' table and budget,
  and hands its writes to the parent, which makes them through the one sink (the API server, or
  the state store) under the pod's name. The parent remembers which worker wrote each device as
  connected last: a session ending in worker A after the device reconnected through worker B
  of the same pod would pass the sink's "still this proxy?" test (same pod name) and overwrite
  B's "connected", so the parent drops it. When a worker dies, the parent writes its devices
  disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cloudconnector.errors import ConnectorError, PermanentError
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.proxy.presence import ConnectionStatus, PresenceSink
from cloudconnector.routes import Route

log = logging.getLogger("cloudconnector.proxy.workers")

_LENGTH = struct.Struct("!I")
RESTART_FIRST, RESTART_MAX, RESTART_CALM = 0.5, 10.0, 60.0  # backoff seconds; calm: reset after
START_TIMEOUT = 60.0  # seconds for every worker to listen at start-up
METRICS_TIMEOUT = 2.0
# Imported, not run as ``-m``: the messages' classes must be this module's, not ``__main__``'s.
WORKER_ENTRY = (
    "import sys; from cloudconnector.proxy.workers import worker_main; sys.exit(worker_main(sys.argv[1:]))"
)


# ------------------------------------------------------------------ how many


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (v2 ``cpu.max``, else v1 CFS quota); None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: affinity mask and cgroup quota, the smaller; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))  # 1.5 CPUs: two workers, each idle part of the time
    return max(1, cores)


def worker_count(setting: int | None) -> int:
    return setting if setting is not None else available_cores()


def worker_config(cfg: ProxyConfig, count: int) -> ProxyConfig:
    """A worker's share of the pod's limits; the parent serves HTTP."""
    return dataclasses.replace(
        cfg,
        http_port=None,
        max_connections=max(1, math.ceil(cfg.max_connections / count)),
        max_unidentified_bytes=max(cfg.max_connect_size, cfg.max_unidentified_bytes // count),
        status_writes_per_second=cfg.status_writes_per_second / count,
    )


# ------------------------------------------------------------------ the channel


def _frame(message: Any) -> bytes:
    # Pickle between a parent and the children it started from its own interpreter: both ends
    # are this program, nothing else can write to a socket pair.
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        body = await reader.readexactly(_LENGTH.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return pickle.loads(body)  # noqa: S301 - our own child or parent, see _frame


@dataclass(frozen=True)
class Hello:
    """What a worker needs to start: sent first on its channel."""

    index: int
    config: ProxyConfig
    sockets: dict[str, int]  # "mqtt"/"tls" -> inherited file descriptor
    keys: str  # "vault" (cloud-connector-proxy) or a state directory (cloud-connector run)
    proxy_name: str
    presence: bool
    log_level: int


# ------------------------------------------------------------------ the parent's directory


class PublishingDirectory(StaticDirectory):
    """A :class:`StaticDirectory` that tells its listeners every change, for the workers."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._listeners: list[Callable[[tuple[Any, ...]], None]] = []
        super().__init__(routes)

    def listen(self, listener: Callable[[tuple[Any, ...]], None]) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[tuple[Any, ...]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _tell(self, message: tuple[Any, ...]) -> None:
        for listener in list(self._listeners):
            listener(message)

    def replace(self, routes: Iterable[Route]) -> None:
        routes = list(routes)
        super().replace(routes)
        self._tell(("replace", routes))

    def put(self, route: Route) -> None:
        super().put(route)
        self._tell(("put", route))

    def remove(self, device: ObjectRef) -> None:
        super().remove(device)
        self._tell(("remove", device))


# ------------------------------------------------------------------ the parent


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    listening: bool = False
    restarts: int = 0
    served: bool = False  # listened at least once
    metrics_waiting: dict[int, asyncio.Future[bytes]] = dataclasses.field(default_factory=dict)
    send: Callable[[tuple[Any, ...]], None] | None = None


class WorkerPool:
    """Start, feed, supervise and drain ``count`` workers serving ``config``'s ports."""

    def __init__(
        self,
        config: ProxyConfig,
        count: int,
        directory: PublishingDirectory,
        keys: str,
        sink: PresenceSink | None,
        proxy_name: str,
    ) -> None:
        self.config = config
        self.count = count
        self.directory = directory
        self.keys = keys
        self.sink = sink if config.connection_status else None
        self.proxy_name = proxy_name
        self.ports: dict[str, int] = {}
        self.workers = [_Worker(i) for i in range(count)]
        self.stopping = False
        self._sockets: dict[str, list[socket.socket]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failed: asyncio.Future[str] | None = None
        self._statuses: asyncio.Queue[tuple[int, ObjectRef, ConnectionStatus, bool]] = asyncio.Queue()
        self._holder: dict[ObjectRef, tuple[int, ConnectionStatus]] = {}  # who wrote "connected" last
        self._seq = 0

    @property
    def ready(self) -> bool:
        return not self.stopping and all(w.listening for w in self.workers)

    async def start(self) -> None:
        """Bind, start every worker and return once all listen; a start-up failure raises."""
        from cloudconnector.proxy.server import _listen

        cfg = self.config
        for name, port in (("mqtt", cfg.mqtt_port), ("tls", cfg.tls_port)):
            if port is None:
                continue
            probe = _listen(cfg.bind, port)  # the one-line error when the port is taken
            bound = probe.getsockname()[1]
            probe.close()
            self._sockets[name] = [self._reuseport(cfg.bind, bound) for _ in range(self.count)]
            self.ports[name] = bound
        self._failed = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._write_statuses()))
        self._tasks += [asyncio.create_task(self._supervise(w)) for w in self.workers]
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.listening for w in self.workers):
            done, _ = await asyncio.wait([self._failed], timeout=0.05)
            if done:
                raise PermanentError(self._failed.result(), reason="WorkerStart")
            if time.monotonic() > deadline:
                raise PermanentError(
                    f"workers not listening after {START_TIMEOUT:.0f} s", reason="WorkerStart"
                )
        log.info(
            "proxy listening",
            extra={
                "ports": dict(self.ports),
                "workers": self.count,
                "pids": [self._pid(w) for w in self.workers],
            },
        )

    @staticmethod
    def _reuseport(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
        return sock

    @staticmethod
    def _pid(worker: _Worker) -> int | None:
        return worker.proc.pid if worker.proc is not None else None

    async def stop(self) -> None:
        """Every worker drains its sessions (in parallel), then the status writes left are made."""
        self.stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        deadline = self.config.drain_seconds + 10.0
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    log.warning("worker did not drain in time, killed", extra={"pid": p.pid})
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
        writer, supervisors = self._tasks[:1], self._tasks[1:]
        if supervisors:  # each reads what its worker sent before it exited, then returns
            await asyncio.wait(supervisors, timeout=5)
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._statuses.join()  # the drained workers' "disconnected" writes
        for task in writer:
            task.cancel()
        await asyncio.gather(*writer, return_exceptions=True)
        for socks in self._sockets.values():
            for sock in socks:
                sock.close()

    # -------------------------------------------------------------- one worker's life

    async def _supervise(self, w: _Worker) -> None:
        delay, started = RESTART_FIRST, 0.0
        while not self.stopping:
            started = time.monotonic()
            code = await self._run_once(w)
            w.listening = False
            if self.stopping:
                return
            self._forget(w.index)
            if code == 2 and not any(x.served for x in self.workers):
                assert self._failed is not None
                if not self._failed.done():
                    self._failed.set_result(f"worker {w.index} could not start (its log line says why)")
                return
            delay = (
                RESTART_FIRST if time.monotonic() - started > RESTART_CALM else min(delay * 2, RESTART_MAX)
            )
            log.error(
                "proxy worker exited, restarting",
                extra={"worker": w.index, "code": code, "seconds": delay},
            )
            w.restarts += 1
            await asyncio.sleep(delay)

    async def _run_once(self, w: _Worker) -> int:
        mine, theirs = socket.socketpair()
        fds = {name: socks[w.index].fileno() for name, socks in self._sockets.items()}
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WORKER_ENTRY,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(), *fds.values()),
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent, which drains them
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        w.writer = writer
        hello = Hello(
            w.index,
            worker_config(self.config, self.count),
            fds,
            self.keys,
            self.proxy_name,
            self.sink is not None,
            logging.getLogger().getEffectiveLevel(),
        )

        def send(message: tuple[Any, ...]) -> None:
            if not writer.is_closing():
                writer.write(_frame(message))

        # The whole table, then every change after it: no await between the two.
        writer.write(_frame(hello))
        writer.write(_frame(("replace", self.directory.routes())))
        w.send = send
        self.directory.listen(send)
        reading = asyncio.create_task(self._read(w, reader))
        try:
            return await w.proc.wait()
        finally:
            self.directory.unlisten(send)
            w.send = None
            # The last status writes may still be in the socket: read to its end, briefly.
            await asyncio.wait([reading], timeout=2)
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            writer.close()
            for future in w.metrics_waiting.values():
                future.cancel()
            w.metrics_waiting.clear()

    async def _read(self, w: _Worker, reader: asyncio.StreamReader) -> None:
        while (message := await _receive(reader)) is not None:
            kind = message[0]
            if kind == "listening":
                w.listening = w.served = True
            elif kind == "status":
                _, device, status, ended = message
                self._statuses.put_nowait((w.index, device, status, ended))
            elif kind == "metrics":
                future = w.metrics_waiting.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_result(message[2])

    # -------------------------------------------------------------- connection status

    def _forget(self, index: int) -> None:
        """A dead worker's devices are not connected any more."""
        for device, (holder, status) in list(self._holder.items()):
            if holder == index:
                ended = ConnectionStatus(**{**status, "connected": False})  # type: ignore[typeddict-item]
                self._statuses.put_nowait((index, device, ended, True))

    async def _write_statuses(self) -> None:
        while True:
            index, device, status, ended = await self._statuses.get()
            try:
                await self._write_status(index, device, status, ended)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the next change writes again; never the relay's problem
                log.warning("connection status not written: %s", e, extra={"device": str(device)})
            finally:
                self._statuses.task_done()

    async def _write_status(
        self, index: int, device: ObjectRef, status: ConnectionStatus, ended: bool
    ) -> None:
        if self.sink is None:
            return
        if not ended:
            self._holder[device] = (index, status)
            await self.sink.write(device, status)
            return
        holder = self._holder.get(device)
        if holder is not None and holder[0] != index:
            return  # the device reconnected through another worker of this pod meanwhile
        self._holder.pop(device, None)
        await self.sink.write_ended(device, status, self.proxy_name)

    # -------------------------------------------------------------- metrics

    async def render(self) -> bytes:
        """Every worker's metrics summed, with the per-worker families."""
        loop = asyncio.get_running_loop()
        asked: list[tuple[_Worker, asyncio.Future[bytes]]] = []
        for w in self.workers:
            if w.send is None or not w.listening:
                continue
            self._seq += 1
            future: asyncio.Future[bytes] = loop.create_future()
            w.metrics_waiting[self._seq] = future
            w.send(("metrics", self._seq))
            asked.append((w, future))
        texts: dict[int, str] = {}
        for w, future in asked:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(METRICS_TIMEOUT):
                    texts[w.index] = (await future).decode()
        return self._aggregate(texts).encode()

    def _aggregate(self, texts: dict[int, str]) -> str:
        families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        attempts: dict[int, float] = {}
        sessions: dict[int, float] = {}
        for index, text in texts.items():
            for family in text_string_to_metric_families(text):
                _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue  # a creation time, not a quantity
                    key = (s.name, tuple(sorted(s.labels.items())))
                    samples[key] = samples.get(key, 0.0) + s.value
                    if s.name == "cloudconnector_proxy_connections_total":
                        attempts[index] = attempts.get(index, 0.0) + s.value
                    elif s.name == "cloudconnector_proxy_active_sessions":
                        sessions[index] = s.value
        lines: list[str] = []
        for name, (kind, doc, samples) in families.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f"{n}{_labels(dict(labels))} {_number(v)}" for (n, labels), v in samples.items()]
        info, conns, restarts = (
            f"cloudconnector_proxy_worker_{n}" for n in ("info", "connections", "restarts")
        )
        lines += [f"# HELP {info} A worker process: its index and pid.", f"# TYPE {info} gauge"]
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                lines.append(f"{info}{_labels({'worker': str(w.index), 'pid': str(w.proc.pid)})} 1.0")
        name = "cloudconnector_proxy_worker_sessions"
        lines += [f"# HELP {name} Relaying device sessions of a worker.", f"# TYPE {name} gauge"]
        lines += [f"{name}{_labels({'worker': str(i)})} {v!r}" for i, v in sorted(sessions.items())]
        for name, doc, value in (
            (conns, "Connection attempts a worker took.", lambda w: attempts.get(w.index, 0.0)),
            (restarts, "Times a worker was started again after it exited.", lambda w: float(w.restarts)),
        ):
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            lines += [f"{name}_total{_labels({'worker': str(w.index)})} {value(w)!r}" for w in self.workers]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}"


def _number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else ("+Inf" if value > 0 else "-Inf")


# ------------------------------------------------------------------ the worker


class ChannelSink:
    """A worker's :class:`PresenceSink`: writes go to the parent, which makes them (see above)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self.send = send

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        self.send(("status", device, status, False))

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        self.send(("status", device, status, True))
        return True


class _SharedStrings:
    """One copy of each CA certificate in a worker (every device of an Endpoint has the same)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def route(self, route: Route) -> Route:
        if route.ca_pem is None:
            return route
        return dataclasses.replace(route, ca_pem=self._seen.setdefault(route.ca_pem, route.ca_pem))


async def _open_keys(spec: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
    if spec == "vault":
        from cloudconnector.keystore.vault import VaultKeyStore

        store = VaultKeyStore.from_env()

        async def close_vault() -> None:
            await store.aclose()  # its HTTP session lives on this loop

        return store, close_vault
    from cloudconnector.standalone.keys import open_key_stores

    stores = open_key_stores(Path(spec))

    async def close_local() -> None:
        closers = stores.closer if isinstance(stores.closer, tuple) else (stores.closer,)
        for closer in dict.fromkeys(c for c in closers if c is not None):
            result = getattr(closer, "close", lambda: None)()
            if asyncio.iscoroutine(result):
                await result

    return stores.reader, close_local


async def _worker(channel: socket.socket) -> int:
    from cloudconnector.proxy.logs import configure_logging
    from cloudconnector.proxy.presence import Presence
    from cloudconnector.proxy.server import Proxy

    reader, writer = await asyncio.open_unix_connection(sock=channel)
    hello = await _receive(reader)
    if not isinstance(hello, Hello):
        print("cloud-connector proxy worker: no start message from the parent", file=sys.stderr)
        return 1
    cfg = hello.config
    configure_logging(cfg.log_json, hello.log_level)
    old_factory = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:  # every line names its worker
        rec = old_factory(*args, **kwargs)
        rec.worker = hello.index
        return rec

    logging.setLogRecordFactory(record)

    def send(message: tuple[Any, ...]) -> None:
        if not writer.is_closing():
            writer.write(_frame(message))

    strings = _SharedStrings()
    directory = StaticDirectory()
    first = await _receive(reader)
    if first is not None and first[0] == "replace":
        directory.replace(map(strings.route, first[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        keys, close_keys = await _open_keys(hello.keys)
    except ConnectorError as e:
        log.error("cannot start: %s", e)
        return 2
    presence = None
    if hello.presence:
        presence = Presence(
            ChannelSink(send), hello.proxy_name, cfg.status_interval, cfg.status_writes_per_second
        )
    listeners = {name: socket.socket(fileno=fd) for name, fd in hello.sockets.items()}
    proxy = Proxy(cfg, directory, keys, presence=presence, sockets=listeners)
    background: list[asyncio.Task[Any]] = []
    try:
        await proxy.start()
        send(("listening", os.getpid()))
        if presence is not None:
            background.append(asyncio.create_task(presence.run()))

        async def follow() -> None:
            while (message := await _receive(reader)) is not None:
                kind = message[0]
                if kind == "put":
                    directory.put(strings.route(message[1]))
                elif kind == "remove":
                    directory.remove(message[1])
                elif kind == "replace":
                    directory.replace(map(strings.route, message[1]))
                elif kind == "metrics":
                    send(("metrics", message[1], proxy.metrics.render()))
            stop.set()  # the parent is gone: drain and leave

        background.append(asyncio.create_task(follow()))
        await stop.wait()
        await proxy.stop()
        if presence is not None:
            await presence.drain()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    except ConnectorError as e:
        log.error("cannot start: %s", e)
        return 2
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await close_keys()
        writer.close()
    return 0


def worker_main(argv: list[str]) -> int:
    channel = socket.socket(fileno=int(argv[0]))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_worker(channel))
