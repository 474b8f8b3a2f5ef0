"""The inference-engine contract the agent relies on, and its errors.

Error tree::

    EngineError                 anything an engine refuses or fails to do
    ├── ModelLoadError          the file is missing, unreadable, or the runtime rejects it
    ├── ContextOverflowError    prompt tokens + max_tokens exceed n_ctx
    └── UnsupportedOperation    the operation does not apply to this format (e.g. infer on GGUF)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class EngineError(Exception):
    """An engine failed or refused an operation."""


class ModelLoadError(EngineError):
    """The model file could not be loaded by its runtime."""


class ContextOverflowError(EngineError):
    """The prompt plus the requested tokens do not fit in the context window."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) > n_ctx ({n_ctx})")
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class UnsupportedOperation(EngineError):
    """The operation does not apply to this engine's model format."""


@dataclass(frozen=True)
class TokenChunk:
    """One generated token's text; the last chunk of a stream carries the finish reason."""

    text: str
    finish_reason: str | None = None


@runtime_checkable
class Engine(Protocol):
    """A loaded model. Generation is serialized per engine, so one engine may serve many threads.

    `complete` and `chat` return generators that hold the engine's lock while they run: exhaust
    them or call `.close()` on them.
    """

    format: str
    model_path: Path
    n_ctx: int

    def smoke_test(self, timeout_s: float = 10.0) -> None: ...

    def complete(
        self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, stop: list[str] | None = None
    ) -> Iterator[TokenChunk]: ...

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
    ) -> Iterator[TokenChunk]: ...

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


def check_context(*, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
    """Raise ContextOverflowError unless the prompt and the requested tokens fit in n_ctx."""
    if max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompt_tokens + max_tokens > n_ctx:
        raise ContextOverflowError(prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=n_ctx)


class StopScanner:
    """Holds back generated text that could be the start of a stop string, as streaming servers do.

    `feed` returns the text now safe to emit and whether a stop string was completed (the stop
    string and anything after it are dropped).
    """

    def __init__(self, stop: list[str] | None) -> None:
        self._stops = [s for s in (stop or []) if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self._pending += text
        for s in self._stops:
            index = self._pending.find(s)
            if index >= 0:
                emitted, self._pending = self._pending[:index], ""
                return emitted, True
        hold = self._longest_stop_prefix_suffix()
        cut = len(self._pending) - hold
        emitted, self._pending = self._pending[:cut], self._pending[cut:]
        return emitted, False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best


def call_with_timeout(fn: Callable[[], None], *, timeout_s: float, what: str) -> None:
    """Run `fn` in a worker thread; raise EngineError if it fails or has not returned in time.

    Native inference cannot be interrupted, so a timed-out worker is left to finish on its own
    (daemon thread); the caller gets its answer on time, which is what a health check needs.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised below in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target, name=f"engine-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EngineError(f"{what} did not finish within {timeout_s:g} s")
    if errors:
        if isinstance(errors[0], EngineError):
            raise errors[0]
        raise EngineError(f"{what} failed: {errors[0]!r}") from errors[0]


class GenerationLock:
    """A per-engine lock that refuses, instead of deadlocking, a thread that already holds it.

    Streams hold the lock between tokens, so a consumer that calls its engine while iterating one
    of its streams would otherwise wait for itself forever. Any thread may release it (a stream
    may be closed from a thread other than the one that started it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> None:
        if self._owner == threading.get_ident():
            raise EngineError("engine called from inside one of its own streams; finish or close it first")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc_info: object) -> None:
        self._owner = None
        self._lock.release()
