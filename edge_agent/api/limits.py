"""A bounded queue in front of the model.

One request uses the model at a time (the engine generates one sequence at a time) and
`max_queued` wait for it, first come first served; any more are refused at once (429 with
Retry-After) instead of piling up.

`BodyLimit` refuses an oversize request body (413) before any route reads or tokenizes it: at once
when its Content-Length says so, else as soon as the bytes received pass the limit.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.api.errors import APIError, ApiErrorCode

_HEAD_ROOM_S = 1.0  # the shortest Retry-After we send


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes HTTPExceptions through to the app's handler (a JSON 413)."""

    def __init__(self) -> None:
        super().__init__(413, "the request body is larger than this device accepts")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, before the application has read them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            message = f"the request body ({int(declared)} bytes) is over this device's limit ({self.max_bytes})"
            await APIError(413, message, code=ApiErrorCode.REQUEST_TOO_LARGE).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


class QueueFull(APIError):
    def __init__(self, queued: int, retry_after_s: float) -> None:
        super().__init__(
            429,
            f"the model is busy and {queued} requests are already waiting; retry later",
            type_="rate_limit_error",
            code=ApiErrorCode.QUEUE_FULL,
            retry_after_s=retry_after_s,
        )


class RequestQueue:
    """One request at a time uses the model; up to `max_queued` wait (FIFO); more get QueueFull."""

    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self.in_flight = 0
        self.queued = 0
        self._turn = asyncio.Semaphore(1)
        self._typical_s = _HEAD_ROOM_S  # a moving average of how long a turn takes

    async def enter(self) -> None:
        """Wait for this request's turn; raises QueueFull when the queue is full."""
        if self._turn.locked() and self.queued >= self.max_queued:
            raise QueueFull(self.queued, max(_HEAD_ROOM_S, math.ceil(self._typical_s * (self.queued + 1))))
        self.queued += 1
        try:
            await self._turn.acquire()
        finally:
            self.queued -= 1
        self.in_flight += 1

    def leave(self, held_s: float) -> None:
        self.in_flight -= 1
        self._typical_s = 0.8 * self._typical_s + 0.2 * held_s
        self._turn.release()

    def gauges(self) -> tuple[Callable[[], float], Callable[[], float]]:
        """Readers of (requests using the model, requests waiting for it) for the metrics."""
        return (lambda: self.in_flight), (lambda: self.queued)
