"""One log format for the proxy however it runs (``cloud-connector-proxy``, ``cloud-connector run``).

The proxy puts what a line is about in the record's extra fields (``peer``, ``device``, ``result``,
``reason``, ...). With ``CC_PROXY_LOG_JSON`` they become keys of one JSON object per line;
without, they follow the message as ``key=value`` pairs, so that neither format drops them.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, TIME_FORMAT),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(extra_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__  # the type only: tracebacks may carry data
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; values with spaces are quoted. As in JSON, an
    exception shows as its type only."""

    def format(self, record: logging.LogRecord) -> str:
        time = self.formatTime(record, TIME_FORMAT)
        parts = [f"{time} {record.levelname} {record.name}: {record.getMessage()}"]
        parts += [f"{k}={_plain(v)}" for k, v in extra_fields(record).items()]
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"error={record.exc_info[0].__name__}")
        return " ".join(parts)


def _plain(value: object) -> str:
    text = json.dumps(value, default=str) if isinstance(value, dict | list | tuple) else str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


def configure_logging(as_json: bool, level: str | int) -> None:
    """Every logger of the process to stderr in the proxy's format (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else PlainFormatter())
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, handlers=[handler], force=True)


def describe(error: BaseException) -> str:
    """A reason for a log line that is never empty (``str(TimeoutError())`` is)."""
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    return str(error) or type(error).__name__
