"""The FastAPI application: routers, RFC 9457 error handlers, request ids."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api import docs
from control_plane.api.auth_first import AuthenticateFirstMiddleware, allowed_methods
from control_plane.api.limits import BodyLimitMiddleware, PayloadTooLarge
from control_plane.api.openapi import install_openapi
from control_plane.api.problems import problem_response
from control_plane.api.ratelimit import RateLimiter
from control_plane.api.routes import (
    artifacts,
    devices,
    events,
    health,
    jobs,
    metrics,
    modelopt,
    models,
    rollouts,
    telemetry,
    tokens,
)
from control_plane.config import Settings
from control_plane.dashboard import actions as dashboard_actions
from control_plane.dashboard import routes as dashboard
from control_plane.db import make_engine
from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.access import BrokerAccess, mosquitto_takeover, password_file_for
from control_plane.metrics import HttpMetricsMiddleware
from control_plane.storage import make_blob_store
from control_plane.trust.releases import ReleaseSigner
from control_plane.trust.releases import configure as configure_signing

log = logging.getLogger("slmops.api")


class RequestIdMiddleware:
    """Give every request an id (or keep the caller's X-Request-ID) and echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = incoming or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


class HstsMiddleware:
    """Strict-Transport-Security on every response served over https (RFC 6797 s. 7.2: never over http)."""

    def __init__(self, app: ASGIApp, max_age_s: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age_s}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append(self.header)
            await send(message)

        await self.app(scope, receive, send_with_hsts)


def _problem_response(
    request: Request, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return problem_response(request.url.path, status, code, detail, headers=headers, **extra)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        return _problem_response(request, exc.status, exc.code, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _problem_response(request, 422, ErrorCode.VALIDATION_ERROR, "the request is not valid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, PayloadTooLarge):
            # The rest of a streamed body is still on the connection: closing it is cheaper than reading it.
            closing = {"Connection": "close"}
            return _problem_response(
                request, 413, ErrorCode.PAYLOAD_TOO_LARGE, str(exc.detail), closing, limit_bytes=exc.limit
            )
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorCode.HTTP_ERROR)
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := allowed_methods(request.scope)):
            headers["Allow"] = ", ".join(methods)
        return _problem_response(request, exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _problem_response(request, 500, ErrorCode.INTERNAL_ERROR, "unexpected server error; see the server log")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = None
    settings: Settings = app.state.settings
    # The registry decides who the broker admits: rebuilt before the fleet connects to it.
    access = BrokerAccess(password_file_for(settings), takeover=mosquitto_takeover(settings))
    await run_in_threadpool(access.rebuild, app.state.engine)
    app.state.broker_access = access
    if settings.fleet_enabled:
        from control_plane.fleet.channel import FleetRuntime

        runtime = FleetRuntime(settings, app.state.engine)
        await run_in_threadpool(runtime.start)
        app.state.device_mqtt_url = runtime.device_mqtt_url
        access.embedded = runtime.broker
    app.state.fleet = runtime
    try:
        yield
    finally:
        if runtime is not None:
            await run_in_threadpool(runtime.stop)


def create_app(settings: Settings | None = None, engine: sa.Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="slmops control plane",
        version="0.1.0",
        description="Model registry, device registry and staged rollouts for edge fleets of small LMs.",
        docs_url=None,  # served by api/docs.py from the package, never from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine or make_engine(settings.sqlalchemy_url)
    app.state.blob_store = make_blob_store(settings)
    # Every desired state names a signed release (unsigned only where a benchmark measures the cost).
    configure_signing(ReleaseSigner.from_settings(settings) if settings.release_signing else None)
    if settings.device_certificates:
        from control_plane.trust.device_ca import DeviceCA

        app.state.device_ca = DeviceCA.load_or_create(settings.device_ca_path)
    app.state.rate_limiter = RateLimiter(
        {
            "auth": settings.rate_limit_auth_failures_per_min,
            "enroll": settings.rate_limit_enroll_failures_per_min,
            "login": settings.rate_limit_login_failures_per_min,
        }
    )
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    app.add_middleware(AuthenticateFirstMiddleware)  # outside the cap: no credential, no word on sizes
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    if settings.hsts_max_age_s > 0:
        app.add_middleware(HstsMiddleware, max_age_s=settings.hsts_max_age_s)
    _install_error_handlers(app)
    for module in (health, models, modelopt, jobs, artifacts, devices, tokens, rollouts, dashboard, telemetry, metrics,
                   dashboard_actions):  # fmt: skip
        app.include_router(module.router)
    app.include_router(events.router)
    app.include_router(docs.router)
    install_openapi(app)
    return app
