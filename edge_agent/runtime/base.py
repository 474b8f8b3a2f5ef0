"""The inference-engine contract the agent relies on, and its errors.

Error tree::

    EngineError                 anything an engine refuses or fails to do
    ├── ModelLoadError          the file is missing, unreadable, or the runtime rejects it
    ├── ContextOverflowError    prompt tokens + max_tokens exceed n_ctx
    ├── InvalidInput            the request's own content cannot be generated from (an empty prompt)
    └── UnsupportedOperation    the operation does not apply to this format (e.g. infer on GGUF)
        └── UnsupportedParameter    a request option this engine does not implement (names it)

Every error but ModelLoadError and a bare EngineError is the caller's: it says nothing about the
model's health.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge_agent.errors import EdgeAgentError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class EngineError(EdgeAgentError):
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


class InvalidInput(EngineError):
    """The request's content cannot be generated from (e.g. a prompt that is no tokens at all)."""


class UnsupportedOperation(EngineError):
    """The operation does not apply to this engine's model format."""


class UnsupportedParameter(UnsupportedOperation):
    """A request option this engine does not implement; refused, never silently ignored."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """How to pick each token, with OpenAI's defaults (plain softmax sampling, no truncation).

    temperature 0 is greedy. A seed of None draws a fresh one per request. `json_schema` constrains
    the output to JSON matching it ({} for any JSON object). `logprobs` None reports none; n reports
    the chosen token's log-probability and the n most likely alternatives.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the most likely alternatives."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """Generated text; the last chunk of a stream carries the finish reason.

    `tokens` is how many generated tokens this chunk accounts for: a character spread over several
    tokens arrives in one chunk, and a closing chunk may account for none.
    """

    text: str
    finish_reason: str | None = None
    tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] = field(default=())


class TokenStream(Iterator[TokenChunk]):
    """A generation's chunks and the number of prompt tokens the engine evaluated for it."""

    def __init__(self, chunks: Generator[TokenChunk, None, None], *, prompt_tokens: int) -> None:
        self._chunks = chunks
        self.prompt_tokens = prompt_tokens

    def __next__(self) -> TokenChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()


@runtime_checkable
class Engine(Protocol):
    """A loaded model. Generation is serialized per engine, so one engine may serve many threads.

    `complete` and `chat` return token streams that hold the engine's lock while they run: exhaust
    them or call `.close()` on them. A stream's `prompt_tokens` is what the engine evaluated.
    """

    format: str
    model_path: Path
    n_ctx: int

    def smoke_test(self, timeout_s: float = 10.0) -> None: ...

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream: ...

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        sampling: Sampling | None = None,
    ) -> TokenStream: ...

    def infer(self, inputs: dict[str, Any]) -> dict[str, Any]: ...

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


def sampling_of(temperature: float, sampling: Sampling | None) -> Sampling:
    """`sampling` when given, else plain sampling at `temperature` (the short form callers use)."""
    return sampling if sampling is not None else Sampling(temperature=temperature)


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
