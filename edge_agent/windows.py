"""Telemetry windows on a schedule, cut early when the serving model changes.

A window never mixes two model versions: rollout gates compare a new version's latency and errors
with the old one's, so a swap closes the current window. Closed windows are published from the
telemetry thread, never from a request's thread (a slow publisher must not delay inference).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from edge_agent.telemetry import RequestRecord, SystemSampler, WindowAggregator
from shared.desired import DesiredState
from shared.telemetry import TelemetryWindow

log = logging.getLogger(__name__)


def _identity(spec: DesiredState) -> tuple[str, str, str]:
    return spec.model, spec.version, spec.artifact.sha256


class TelemetryWindows:
    def __init__(
        self,
        aggregator: WindowAggregator,
        sampler: SystemSampler,
        *,
        window_s: float,
        serving: Callable[[], DesiredState | None],
        publish: Callable[[TelemetryWindow], None],
    ) -> None:
        self.aggregator = aggregator
        self.sampler = sampler
        self.window_s = window_s
        self.serving = serving
        self.publish = publish
        self._lock = threading.Lock()
        self._spec: DesiredState | None = None  # the model this window's requests ran on
        self._requests = 0
        self._closed: queue.Queue[TelemetryWindow] = queue.Queue()

    def record(self, spec: DesiredState | None, record: RequestRecord) -> None:
        with self._lock:
            if spec is not None and self._spec is not None and _identity(spec) != _identity(self._spec):
                self._closed.put(self._close())
            if spec is not None:
                self._spec = spec
            self._requests += 1
            self.aggregator.record(record)

    def flush(self) -> TelemetryWindow:
        """Close the current window now and publish it (on the caller's thread)."""
        with self._lock:
            window = self._close()
        self.publish(window)
        return window

    def run(self, stopping: threading.Event) -> None:
        """Publish windows until `stopping` is set: on schedule, and those cut early by a swap."""
        due = time.monotonic() + self.window_s
        while not stopping.is_set():
            try:
                due = self._step(due)
            except Exception:  # a sensor or publisher failure costs one window, not the thread
                log.exception("telemetry window failed")

    def _step(self, due: float) -> float:
        try:
            window = self._closed.get(timeout=min(max(due - time.monotonic(), 0.0), 1.0))
        except queue.Empty:
            if time.monotonic() < due:
                return due
            due += self.window_s
            with self._lock:
                window = self._close()
        self.publish(window)
        return due

    def _close(self) -> TelemetryWindow:
        spec = self._spec if self._requests else self.serving()
        self._spec, self._requests = None, 0
        return self.aggregator.close_window(
            model=spec.model if spec else None,
            version=spec.version if spec else None,
            sha256=spec.artifact.sha256 if spec else None,
            system=self.sampler.sample(),
        )
