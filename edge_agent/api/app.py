"""Builds the agent's FastAPI application around a running Agent."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.api import admin_routes, openai_routes, ops_routes
from edge_agent.api.errors import install_error_handlers
from edge_agent.api.limits import BodyLimit, RequestQueue


def create_app(agent: Agent, *, admin_token: str | None = None) -> FastAPI:
    settings = agent.settings
    app = FastAPI(title="slmops edge agent", version=__version__, docs_url=None, redoc_url=None)
    app.state.agent = agent
    app.state.admin_token = admin_token
    app.state.queue = RequestQueue(settings.max_queued_requests)
    agent.metrics.watch_queue(*app.state.queue.gauges())
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)  # 413 before anything is tokenized
    if settings.cors_allow_origins:  # off unless origins are listed: browsers then may call the API
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    install_error_handlers(app)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    return app
