"""Request body caps: refused by Content-Length before a byte is read, counted while streamed.

Only the artifact upload routes take `max_upload_bytes` (and only as multipart); every other body
(JSON, login forms) is capped at `max_body_bytes`. A body over its cap is a 413 `payload_too_large`.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api.problems import problem_response
from control_plane.errors import ErrorCode

# POST /v1/models/{name}/versions and /v1/models/{name}/versions/{version}/artifacts
UPLOAD_PATH = re.compile(r"^/v1/models/[^/]+/versions(/[^/]+/artifacts)?/?$")


class PayloadTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this route accepts ({limit} bytes)")
        self.limit = limit


def body_limit(scope: Scope, *, max_body_bytes: int, max_upload_bytes: int) -> int:
    headers = dict(scope.get("headers") or [])
    multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
    if scope.get("method") == "POST" and multipart and UPLOAD_PATH.match(scope.get("path", "")):
        return max_upload_bytes
    return max_body_bytes


def declared_length(scope: Scope) -> int | None:
    raw = dict(scope.get("headers") or []).get(b"content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class BodyLimitMiddleware:
    """Refuse a body over the route's cap by its Content-Length; count the bytes of any other."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope, max_body_bytes=self.max_body_bytes, max_upload_bytes=self.max_upload_bytes)
        length = declared_length(scope)
        if length is not None and length > limit:
            await too_large_response(scope, limit)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


def too_large_response(scope: Scope, limit: int) -> JSONResponse:
    detail = f"the request body is larger than this route accepts ({limit} bytes)"
    # The unread body stays on the connection: closing it is cheaper than reading it.
    return problem_response(
        scope.get("path", ""),
        413,
        ErrorCode.PAYLOAD_TOO_LARGE,
        detail,
        headers={"Connection": "close"},
        limit_bytes=limit,
    )
