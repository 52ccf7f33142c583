"""How reconcilers tell people what happened, without knowing about Kubernetes events.

The operator turns these into Kubernetes events on the object; the standalone mode logs them.
Messages must never carry secrets: reconcilers only pass names, ids and short error texts.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from cloudconnector.errors import short


class Reporter(Protocol):
    def info(self, reason: str, message: str) -> None: ...

    def warn(self, reason: str, message: str) -> None: ...


class LogReporter:
    """A reporter that writes to a logger; the default when nobody listens for events."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self._logger = logger or logging.getLogger("cloudconnector.core")

    def info(self, reason: str, message: str) -> None:
        self._logger.info("%s: %s", reason, short(message))

    def warn(self, reason: str, message: str) -> None:
        self._logger.warning("%s: %s", reason, short(message))
