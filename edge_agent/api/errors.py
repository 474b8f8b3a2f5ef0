"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`, for every failure.

The agent must never die or answer HTML on a bad request; every handler below returns JSON.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)


class ApiErrorCode(StrEnum):
    """Every `error.code` the agent's API answers with its own (OpenAI's where one exists); the value
    is the wire string, stable. A refused admin action carries the agent error's code instead
    (`edge_agent.errors`)."""

    INVALID_JSON = "invalid_json"
    INVALID_VALUE = "invalid_value"
    INVALID_REQUEST = "invalid_request"
    INVALID_INPUTS = "invalid_inputs"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    UNSUPPORTED_OPERATION = "unsupported_operation"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TOO_LARGE = "request_too_large"
    UNAUTHORIZED = "unauthorized"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    MODEL_NOT_LOADED = "model_not_loaded"
    GENERATION_FAILED = "generation_failed"
    EMBEDDING_FAILED = "embedding_failed"
    INTERNAL_ERROR = "internal_error"


class APIError(EdgeAgentError):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: ApiErrorCode | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code: str | None = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def model_unavailable(reason: str, retry_after_s: float | None = 1.0) -> APIError:
    return APIError(503, reason, type_="server_error", code=ApiErrorCode.MODEL_NOT_LOADED, retry_after_s=retry_after_s)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code=ApiErrorCode.INVALID_JSON).response()
    if not loc:  # the body as a whole: missing, or not a JSON object
        return _body_error(request, missing=first.get("type") == "missing").response()
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, message, param=param, code=ApiErrorCode.INVALID_VALUE).response()


def _body_error(request: Request, *, missing: bool) -> APIError:
    content_type = request.headers.get("content-type") or "none"
    if missing:
        message = "the request body is empty: send a JSON object with Content-Type: application/json"
    elif "json" not in content_type:
        message = f"the request body must be JSON sent with Content-Type: application/json (got {content_type})"
    else:
        message = "the request body must be a JSON object"
    return APIError(400, message, code=ApiErrorCode.INVALID_JSON)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: ApiErrorCode.NOT_FOUND, 405: ApiErrorCode.METHOD_NOT_ALLOWED, 413: ApiErrorCode.REQUEST_TOO_LARGE}.get(
        exc.status_code
    )
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, str(exc.detail), type_=type_, code=code).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error: %s", exc, exc_info=exc)
    return APIError(500, "internal error", type_="server_error", code=ApiErrorCode.INTERNAL_ERROR).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
