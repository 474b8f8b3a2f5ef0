"""RFC 9457 problem+json responses, for the exception handlers and the middleware that answers early."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from control_plane.errors import DomainError, ErrorCode, problem

PROBLEM_JSON = "application/problem+json"


def problem_response(
    path: str, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = problem(status, code, detail, instance=path, **extra)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="slmops"'
    if "retry_after_s" in extra:
        headers["Retry-After"] = str(extra["retry_after_s"])
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def domain_error_response(path: str, exc: DomainError) -> JSONResponse:
    return problem_response(path, exc.status, exc.code, exc.detail, **exc.extra)
