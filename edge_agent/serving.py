"""The model taking traffic, held through leases so a swap never pulls an engine from under a request.

A request leases the current `ServingModel`; a swap installs the new one atomically and retires the
old, which closes once its last lease is returned. In-flight requests therefore finish on the model
they started on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from edge_agent.errors import EdgeAgentError
from edge_agent.runtime import Engine
from shared.desired import DesiredState

log = logging.getLogger(__name__)


class NoModelError(EdgeAgentError):
    """No model is serving (none configured yet, or a swap without room for two is in progress)."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass
class ServingModel:
    spec: DesiredState
    engine: Engine
    loaded_at: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: int = 0
    _leases: int = 0
    _retired: bool = False

    @property
    def name(self) -> str:
        return self.spec.model


class ModelSlot:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._current: ServingModel | None = None
        self._unavailable: str | None = None

    @property
    def current(self) -> ServingModel | None:
        return self._current

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable

    @contextmanager
    def lease(self) -> Iterator[ServingModel]:
        with self._lock:
            model = self._current
            if model is None:
                raise NoModelError(self._unavailable or "no model is loaded", retry_after_s=1.0)
            model._leases += 1
        try:
            yield model
        finally:
            self._release(model)

    def record(self, model: ServingModel, *, error: bool) -> None:
        with self._lock:
            model.requests += 1
            model.errors += int(error)

    def install(self, model: ServingModel) -> ServingModel | None:
        """Make `model` take new requests now; the old one closes when its leases are returned."""
        with self._lock:
            old, self._current, self._unavailable = self._current, model, None
            if old is not None:
                old._retired = True
                close_now = old._leases == 0
        if old is not None and close_now:
            _close(old)
        return old

    def take_offline(self, reason: str, *, drain_timeout_s: float = 60.0) -> ServingModel | None:
        """Stop taking requests, wait for in-flight ones, close the engine (to free its memory)."""
        with self._lock:
            old, self._current, self._unavailable = self._current, None, reason
            if old is None:
                return None
            old._retired = True
            deadline = time.monotonic() + drain_timeout_s
            while old._leases and (left := deadline - time.monotonic()) > 0:
                self._drained.wait(left)
            close_now = old._leases == 0
        if close_now:
            _close(old)
        return old

    def set_unavailable(self, reason: str | None) -> None:
        with self._lock:
            self._unavailable = reason

    def _release(self, model: ServingModel) -> None:
        with self._lock:
            model._leases -= 1
            close_now = model._retired and model._leases == 0
            self._drained.notify_all()
        if close_now:
            _close(model)


def _close(model: ServingModel) -> None:
    try:
        model.engine.close()
    except Exception:  # a failing close must not take the agent down; the memory is lost either way
        log.exception("closing engine for %s failed", model.spec.version)
