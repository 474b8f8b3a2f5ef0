"""The `report_seq` a device orders its state and status reports by (shared.messages.Ordered)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("slmops.report_clock")


class ReportClock:
    """Microseconds since the epoch, but never less than one past the last value given (a hybrid
    logical clock): a clock set back while the agent runs does not reorder its reports.

    With `path`, the last value is kept in that file, so a restarted agent also starts above what
    it sent before when the clock was set back while it was down (a device without a real-time
    clock that boots before it has the time). The file is written on each value (state changes and
    connections: rare), replaced whole; one lost to a crash costs only that reset's protection."""

    def __init__(self, path: Path | None = None, now_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        self._path = path
        self._now_us = now_us
        self._lock = threading.Lock()
        self._last = _read(path) if path is not None else 0

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, self._now_us())
            if self._path is not None:
                _write(self._path, self._last)
            return self._last


def _read(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:  # unreadable: the wall clock alone orders the reports
        log.warning("report clock %s unreadable (%s); starting from the wall clock", path, exc)
        return 0


def _write(path: Path, value: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(str(value))
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("report clock %s not saved: %s", path, exc)
