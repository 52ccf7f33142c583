"""The operator's log lines: JSON objects like the proxy's, each naming the object it is about.

Three things make the log usable on call:

* every line about an Endpoint, Group or Device carries ``kind``, ``namespace`` and ``name``:
  kopf's own lines bring them (``k8s_ref``), and lines of our modules get them from the object
  the running handler works on (:func:`about`, a context variable, so concurrent handlers of
  different objects never mix them up);
* a retry that fails for the same reason as the last time is not logged again (at DEBUG only):
  the first line says what is wrong, and a line comes again when the reason changes;
* routine successes of timers (count refreshes, credential rechecks) are DEBUG, not INFO.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

_CURRENT: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "cloudconnector_object", default=None
)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_KOPF_PRIVATE = frozenset({"k8s_ref", "k8s_skip", "settings"})

_TIMER_SUCCESS = re.compile(r"^Timer '[^']*' succeeded\.$")
_SUCCESS = re.compile(r"^(?:Handler|Timer) '([^']*)' succeeded\.$")
_RETRY = re.compile(r"^(?:Handler|Timer) '([^']*)' failed temporarily: (.*)$", re.S)


@contextlib.contextmanager
def about(kind: str, namespace: str, name: str) -> Iterator[None]:
    """Log lines written inside this block (in this task) are about that object."""
    token = _CURRENT.set((kind, namespace, name))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _object_of(record: logging.LogRecord) -> tuple[str, str, str] | None:
    ref = getattr(record, "k8s_ref", None)
    if isinstance(ref, dict) and ref.get("name"):
        return str(ref.get("kind") or ""), str(ref.get("namespace") or ""), str(ref["name"])
    return _CURRENT.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the object, and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj = _object_of(record)
        if obj is not None:
            out["kind"], out["namespace"], out["name"] = obj
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _KOPF_PRIVATE:
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = record.exc_info[0].__name__  # the type only: tracebacks may carry data
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Plain lines for people at a terminal, with ``Kind namespace/name`` in front."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        obj = _object_of(record)
        if obj is None:
            return line
        kind, namespace, name = obj
        head, _, rest = line.partition(": ")
        return f"{head}: {kind} {namespace}/{name}: {rest}"


def _demote(record: logging.LogRecord, level: int) -> None:
    record.levelno = level
    record.levelname = logging.getLevelName(level)


class Quieter(logging.Filter):
    """On kopf's loggers: timer successes and repeated retry reasons go down to DEBUG.

    Installed on the logger itself (not a handler), so it runs before kopf's event poster and
    every handler look at the level.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[Any, str], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        obj = _object_of(record)
        if _TIMER_SUCCESS.match(message):
            _demote(record, logging.DEBUG)
        if (success := _SUCCESS.match(message)) is not None:
            self._last.pop((obj, success.group(1)), None)
        elif (retry := _RETRY.match(message)) is not None:
            key = (obj, retry.group(1))
            if self._last.get(key) == retry.group(2):
                _demote(record, logging.DEBUG)
            else:
                self._last[key] = retry.group(2)
                _demote(record, logging.WARNING)  # it will be retried: not an error yet
            if len(self._last) > 50_000:  # objects come and go; never grow without bound
                self._last.clear()
        return record.levelno >= logging.getLogger().getEffectiveLevel()


def configure(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    quieter = Quieter()
    for name in ("kopf.objects", "kopf.activities", "kopf.reactor", "kopf"):
        logging.getLogger(name).addFilter(quieter)
    # aiohttp's access noise and asyncio's debug chatter say nothing about our objects.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
