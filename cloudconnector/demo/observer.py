"""The broker-side witness: an admin client that sees every message and where it came in.

Each device listener mounts its traffic under ``via/<thing>/``, and only that thing's certificate
opens that listener, so the topic prefix of a message records which certificate delivered it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloudconnector.demo.standins import MOUNT_PREFIX, Broker


@dataclass
class Seen:
    identity: str  # the thing whose certificate opened the listener
    thing: str  # the thing the device says it is (payload)
    device: str
    seq: int
    latency_ms: float


@dataclass
class Observer:
    broker: Broker
    workdir: Path
    seen: list[Seen] = field(default_factory=list)
    malformed: int = 0
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _client: mqtt.Client | None = None

    def start(self) -> None:
        ca = self.workdir / "observer-ca.pem"
        ca.write_text(self.broker.ca_pem)
        cert = self.workdir / "observer.pem"
        cert.write_text(self.broker.observer.cert_pem)
        key = self.workdir / "observer.key"
        key.write_bytes(self.broker.observer.key_pem)
        key.chmod(0o600)
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-observer")
        client.tls_set(
            ca_certs=str(ca), certfile=str(cert), keyfile=str(key), tls_version=ssl.PROTOCOL_TLS_CLIENT
        )

        def on_connect(c: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None) -> None:
            c.subscribe(f"{MOUNT_PREFIX}/#", qos=1)

        def on_subscribe(*_args: object) -> None:
            subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message
        client.connect(self.broker.host, self.broker.admin_port)
        client.loop_start()
        self._client = client
        if not subscribed.wait(10):
            raise RuntimeError("the observer could not subscribe at the broker")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time_ns()
        parts = msg.topic.split("/")
        try:
            data = json.loads(msg.payload)
            item = Seen(
                parts[1], str(data["thing"]), str(data["device"]), int(data["seq"]), (now - data["t"]) / 1e6
            )
        except (ValueError, KeyError, IndexError, TypeError):
            with self._lock:
                self.malformed += 1
            return
        with self._lock:
            self.seen.append(item)
            self._lock.notify_all()

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def wait(self, expected: int, patience: float) -> int:
        """Block until ``expected`` messages were seen or ``patience`` seconds passed."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.seen) >= expected, patience)
            return len(self.seen)

    def stop(self) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
