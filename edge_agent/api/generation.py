"""Runs an engine's blocking token generator on a worker thread and hands tokens to the event loop.

The generator is created, iterated and closed on the same worker thread (the engine's lock lives there).
Tokens travel in batches: the worker wakes the event loop only when it is waiting, so a fast model
costs one loop wake-up per batch, not per token; a non-streaming request wakes it once, at the end.
A client that disconnects sets a cancel flag, so the worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from edge_agent.api.errors import APIError, ApiErrorCode, model_unavailable
from edge_agent.api.limits import RequestQueue
from edge_agent.api.workers import Workers
from edge_agent.runtime import (
    ContextOverflowError,
    Engine,
    EngineError,
    InvalidInput,
    TokenChunk,
    TokenStream,
    UnsupportedOperation,
    UnsupportedParameter,
)
from edge_agent.serving import NoModelError, ServingModel
from edge_agent.telemetry import RequestRecord

StartStream = Callable[[Engine], TokenStream]

# One thread keeps generating request after request (llama.cpp's OpenMP team stays warm).
GENERATION_WORKERS = Workers(name="generate")


class _PrepareFailed(Exception):
    """The engine refused the request before generating: the client's input is at fault."""


@dataclass
class Generation:
    """One request's generation: lease the model, stream tokens, account the request once."""

    agent: object  # edge_agent.agent.Agent; untyped to keep this module free of the agent's imports
    queue: RequestQueue
    operation: str
    requested_model: str
    start_stream: StartStream
    stream: bool = True
    model: ServingModel | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    _items: list[TokenChunk] = field(default_factory=list)
    _outcome: BaseException | bool | None = None  # True: finished; an exception: failed
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiting: bool = False
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _lease: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _started_at: float = 0.0
    _admitted_at: float | None = None
    _first_token_at: float | None = None
    _error_type: str | None = None

    async def open(self) -> list[TokenChunk]:
        """Wait for the model's turn, lease it and wait for the first tokens (so errors get a status)."""
        self._started_at = time.perf_counter()
        try:
            await self.queue.enter()
            self._admitted_at = time.perf_counter()
            try:
                self.model = self._lease.enter_context(self.agent.slot.lease())  # type: ignore[attr-defined]
            except NoModelError as exc:
                raise model_unavailable(str(exc), exc.retry_after_s) from exc
            check_model_name(self.model, self.requested_model)
            loop = asyncio.get_running_loop()
            GENERATION_WORKERS.run(lambda: self._work(loop))
            return await self._next_batch() or []
        except BaseException as exc:
            self.close(error=exc)
            raise

    async def rest(self) -> AsyncIterator[list[TokenChunk]]:
        while (batch := await self._next_batch()) is not None:
            yield batch

    async def _next_batch(self) -> list[TokenChunk] | None:
        """The tokens produced since the last call; None once the stream has ended."""
        while True:
            with self._lock:
                if self._items:
                    batch, self._items = self._items, []
                    return batch
                if self._outcome is not None:
                    if isinstance(self._outcome, BaseException):
                        raise _as_api_error(self._outcome)
                    return None
                self._wake.clear()
                self._waiting = True
            await self._wake.wait()

    def _hand_over(self, loop: asyncio.AbstractEventLoop, chunk: TokenChunk | None, outcome: object = None) -> None:
        with self._lock:
            if chunk is not None:
                self._items.append(chunk)
            if outcome is not None:
                self._outcome = outcome  # type: ignore[assignment]
            notify = self._waiting and (self.stream or outcome is not None)
            if notify:
                self._waiting = False
        if notify:
            with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
                loop.call_soon_threadsafe(self._wake.set)

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.model is not None
        engine = self.model.engine
        try:
            try:
                tokens = self.start_stream(engine)
            except EngineError as exc:
                raise _PrepareFailed(exc) from exc
            self.prompt_tokens = tokens.prompt_tokens  # only a prompt the engine accepted counts
            try:
                for chunk in tokens:
                    self.output_tokens += chunk.tokens
                    if self._first_token_at is None and chunk.tokens:
                        self._first_token_at = time.perf_counter()
                    if chunk.finish_reason:
                        self.finish_reason = chunk.finish_reason
                    self._hand_over(loop, chunk)
                    if self._cancel.is_set():
                        break
            finally:
                tokens.close()
            self._hand_over(loop, None, True)
        except BaseException as exc:  # handed to the request; the worker thread itself never dies loudly
            self._hand_over(loop, None, exc)

    def close(self, *, error: BaseException | None = None) -> None:
        """Stop the worker, return the lease and the queue turn, account the request; later calls do nothing."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        client_error = False
        if isinstance(error, (GeneratorExit, asyncio.CancelledError)):
            self._error_type, client_error = "client_disconnected", True
        elif error is not None:
            api = error if isinstance(error, APIError) else None
            self._error_type = (api.code if api else None) or type(error).__name__
            client_error = api is not None and api.status < 500
        elapsed = time.perf_counter() - self._started_at
        ttft = self._first_token_at - self._started_at if self._first_token_at else None
        record = RequestRecord(elapsed, ttft, self.prompt_tokens, self.output_tokens, self._error_type)
        # A client's mistake says nothing about the model's health: keep it out of the trial count.
        self.agent.record_request(  # type: ignore[attr-defined]
            self.operation, None if client_error else self.model, record
        )
        self._lease.close()
        if self._admitted_at is not None:
            self.queue.leave(time.perf_counter() - self._admitted_at)


def check_model_name(model: ServingModel, requested: str) -> None:
    spec = model.spec
    if requested not in (spec.model, f"{spec.model}:{spec.version}"):
        raise APIError(
            404,
            f"the model {requested!r} does not exist on this device; it serves {spec.model!r}",
            param="model",
            code=ApiErrorCode.MODEL_NOT_FOUND,
        )


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    cause = exc.__cause__ if isinstance(exc, _PrepareFailed) else exc
    if isinstance(cause, ContextOverflowError):
        return APIError(400, str(cause), param="max_tokens", code=ApiErrorCode.CONTEXT_LENGTH_EXCEEDED)
    if isinstance(cause, UnsupportedParameter):
        return APIError(400, str(cause), param=cause.param, code=ApiErrorCode.UNSUPPORTED_PARAMETER)
    if isinstance(cause, InvalidInput):
        return APIError(400, str(cause), code=ApiErrorCode.INVALID_VALUE)
    if isinstance(cause, UnsupportedOperation):
        return APIError(400, str(cause), code=ApiErrorCode.UNSUPPORTED_OPERATION)
    if isinstance(exc, _PrepareFailed):
        return APIError(400, str(cause), code=ApiErrorCode.INVALID_REQUEST)
    return APIError(500, f"generation failed: {exc!r}", type_="server_error", code=ApiErrorCode.GENERATION_FAILED)
