"""Fixtures for the hardening tests: the proxy tests' real peers (mosquitto with mutual TLS, the
test CA, the proxy on a background loop) re-exported from tests/proxy, plus a watch on every log
record so that a test can assert that hostile input never produced an unhandled exception."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import admin, broker, clients, pki, world  # noqa: F401  (fixtures reused)

# What only an unhandled error leaves behind: asyncio's orphaned-task and callback reports, and
# any record carrying a traceback.
ALARMS = ("never retrieved", "Traceback", "Exception in callback", "Unhandled error")


class Records(logging.Handler):
    """Keeps every log record emitted while installed, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def alarms(self) -> list[str]:
        """Records that mean an exception escaped its handler (errors, tracebacks)."""
        bad = []
        for r in self.records:
            text = r.getMessage()
            if r.levelno >= logging.ERROR or r.exc_info or any(a in text for a in ALARMS):
                bad.append(f"{r.name} {r.levelname}: {text[:300]}")
        return bad


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    root = logging.getLogger()
    watched = [root, logging.getLogger("asyncio"), logging.getLogger("cloudconnector")]
    levels = [lg.level for lg in watched]
    for lg in watched:
        lg.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for lg, level in zip(watched, levels, strict=True):
            lg.setLevel(level)
