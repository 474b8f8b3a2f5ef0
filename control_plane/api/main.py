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
from control_plane.broker_access import BrokerAccess, password_file_for
from control_plane.config import Settings
from control_plane.dashboard import routes as dashboard
from control_plane.db import make_engine
from control_plane.errors import DomainError, problem
from control_plane.metrics import HttpMetricsMiddleware
from control_plane.releases import ReleaseSigner
from control_plane.releases import configure as configure_signing
from control_plane.storage import LocalBlobStore

log = logging.getLogger("slmops.api")
PROBLEM_JSON = "application/problem+json"


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


def _problem_response(request: Request, status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = problem(status, code, detail, instance=request.url.path, **extra)
    headers = {"WWW-Authenticate": 'Bearer realm="slmops"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError) -> JSONResponse:
        return _problem_response(request, exc.status, exc.code, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _problem_response(request, 422, "validation_error", "the request is not valid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _problem_response(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _problem_response(request, 500, "internal_error", "unexpected server error; see the server log")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime = None
    settings: Settings = app.state.settings
    # The registry decides who the broker admits: rebuilt before the fleet connects to it.
    access = BrokerAccess(password_file_for(settings))
    await run_in_threadpool(access.rebuild, app.state.engine)
    app.state.broker_access = access
    if settings.fleet_enabled:
        from control_plane.fleet import FleetRuntime

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
    )
    app.state.settings = settings
    app.state.engine = engine or make_engine(settings.sqlalchemy_url)
    app.state.blob_store = LocalBlobStore(settings.blob_dir)
    configure_signing(ReleaseSigner.from_settings(settings))  # every desired state names a signed release
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware)
    _install_error_handlers(app)
    for module in (health, models, modelopt, jobs, artifacts, devices, tokens, rollouts, dashboard, telemetry, metrics):
        app.include_router(module.router)
    app.include_router(events.router)
    return app
