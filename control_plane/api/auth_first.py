"""Authenticate before the body is read: FastAPI reads a route's body before it solves dependencies.

A request that may carry a body, to a route that depends on `any_principal`, has its credential
checked here, before routing; the principal is kept on `request.state` for `any_principal`. So an
unauthenticated caller never makes the server read or parse a body: it gets its 401 (or 429) while
the body is still on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlmodel import Session
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from control_plane.api.deps import any_principal, authenticate_request
from control_plane.api.problems import domain_error_response
from control_plane.errors import DomainError

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuthenticateFirstMiddleware:
    """Check the credential of a request to an authenticated route before that route reads its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[tuple[APIRoute, bool]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _NO_BODY_METHODS and self._guarded(scope):
            request = Request(scope)
            try:
                await run_in_threadpool(_authenticate, request)
            except DomainError as exc:
                await domain_error_response(scope["path"], exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _guarded(self, scope: Scope) -> bool:
        """Whether the route the router will pick (the first full match) needs a principal."""
        if self._routes is None:
            self._routes = [(r, needs_principal(r.dependant)) for r in iter_api_routes(scope["app"].routes)]
        for route, guarded in self._routes:
            if route.matches(scope)[0] == Match.FULL:
                return guarded
        return False


def _authenticate(request: Request) -> None:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        authenticate_request(request, session)


def needs_principal(dependant: Dependant) -> bool:
    return any(dep.call is any_principal or needs_principal(dep) for dep in dependant.dependencies)


def iter_api_routes(routes: Sequence[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, also those of included routers (which FastAPI may keep nested)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from iter_api_routes(inner.routes)


def allowed_methods(scope: Scope) -> list[str]:
    """The methods of the path's most literal template (Starlette's 405 names only the first route's)."""
    matching = [r for r in iter_api_routes(scope["app"].routes) if r.matches(scope)[0] != Match.NONE]
    if not matching:
        return []
    fewest = min(r.path_format.count("{") for r in matching)
    return sorted({m for r in matching if r.path_format.count("{") == fewest for m in r.methods or ()})
