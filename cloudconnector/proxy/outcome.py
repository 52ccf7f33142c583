"""How a session that never reached relaying ends: the metric label, the log reason, the answer."""

from __future__ import annotations

from cloudconnector.mqtt.packets import Connack


class SessionEnd(Exception):
    """Ends a session before relaying; ``result`` is the metrics label, ``reason`` the log text.

    ``answer`` is a CONNACK, or refusal codes by protocol level, for the device; ``level`` is the
    device's protocol level when it is known although its CONNECT was not read whole.
    """

    def __init__(
        self,
        result: str,
        reason: str,
        answer: Connack | dict[int, int] | None = None,
        level: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason
        self.answer = answer
        self.level = level
