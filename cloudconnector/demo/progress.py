"""A one-line progress bar fed by the reconciler's status writes."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from cloudconnector.model import ObjectRef


class ProgressBar:
    def __init__(self, total: int, stream: TextIO | None = None, width: int = 40) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.width = width
        self.phases: dict[ObjectRef, str] = {}
        self._shown = -1.0
        self._tty = self.stream.isatty()
        self._done = False

    def update(self, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        if self._done:  # later writes (the clean-up) are not provisioning progress
            return
        self.phases[ref] = str(status.get("phase") or "")
        now = time.monotonic()
        if self._tty or now - self._shown >= 1.0:
            self._draw()
            self._shown = now

    def _draw(self, end: str = "") -> None:
        done = sum(1 for p in self.phases.values() if p == "Ready")
        failed = sum(1 for p in self.phases.values() if p == "Failed")
        filled = int(self.width * done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        text = f"provisioning [{bar}] {done}/{self.total} Ready" + (f", {failed} Failed" if failed else "")
        if self._tty:
            self.stream.write("\r" + text + end)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self._draw("\n" if self._tty else "")
        self._done = True
