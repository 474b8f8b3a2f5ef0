"""Builds the agent's FastAPI application around a running Agent."""

from __future__ import annotations

from fastapi import FastAPI

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.api import admin_routes, openai_routes, ops_routes
from edge_agent.api.errors import install_error_handlers


def create_app(agent: Agent, *, admin_token: str | None = None) -> FastAPI:
    app = FastAPI(title="slmops edge agent", version=__version__, docs_url=None, redoc_url=None)
    app.state.agent = agent
    app.state.admin_token = admin_token
    install_error_handlers(app)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    return app
