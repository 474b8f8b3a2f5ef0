"""Dashboard pages at `/`; each page's live block is re-fetched with `?partial=live` every 2 s."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from control_plane.api.deps import RateLimiterDep, SessionDep, SettingsDep
from control_plane.dashboard import queries, telemetry
from control_plane.dashboard.render import SECURITY_HEADERS, STATIC_DIR, render
from control_plane.dashboard.session import (
    SameOriginDep,
    ViewerCookieDep,
    clear_session_cookie,
    end_session,
    safe_next,
    set_session_cookie,
    sign_in_required,
    start_session,
)
from control_plane.errors import DomainError
from control_plane.models import DeviceStatus, Model, Role, Rollout, as_utc, utcnow
from control_plane.rollouts.actions import allowed_actions
from control_plane.services import devices as device_service
from control_plane.services.auth import authenticate_token

router = APIRouter(include_in_schema=False)
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
PartialQuery = Annotated[str | None, Query(description="'live': only the block that refreshes")]
RangeQuery = Annotated[str, Query(alias="range", description="5m, 15m, 1h, 6h or 24h")]


@router.get("/login")
def login_form(request: Request, next_path: Annotated[str, Query(alias="next")] = "/") -> Response:
    return render(request, "login.html", None, next=safe_next(next_path), error=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limiter: RateLimiterDep,
    _: SameOriginDep,
    token: Annotated[str, Form()],
    next_path: Annotated[str, Form(alias="next")] = "/",
) -> Response:
    """Check the pasted token against the tokens table, then start a server-side session for it."""
    limiter.check(request, "login")
    try:
        principal = authenticate_token(session, token.strip())
    except DomainError:
        limiter.charge(request, "login")
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=safe_next(next_path),
            error="That token is unknown or revoked.",
        )
    session_id = start_session(session, token_id=principal.id, ttl_s=settings.dashboard_session_ttl_s)
    response = RedirectResponse(safe_next(next_path), status_code=303)
    set_session_cookie(request, response, session_id, settings)
    request.state.actor = principal.actor
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, _: SameOriginDep) -> Response:
    end_session(request, session)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response)
    return response


@router.get("/")
def overview(request: Request, session: SessionDep, viewer: ViewerCookieDep, partial: PartialQuery = None) -> Response:
    if viewer is None:
        return sign_in_required(request, partial)
    summary = queries.fleet_overview(session)
    return render(request, "overview.html", partial, viewer=viewer, summary=summary)


@router.get("/devices")
def devices_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerCookieDep,
    selector: str = "",
    status: str = "",
    version: str = "",
    cursor: str | None = None,
    partial: PartialQuery = None,
) -> Response:
    if viewer is None:
        return sign_in_required(request, partial)
    error: str | None = None
    rows: list[Any] = []
    next_cursor: str | None = None
    try:
        rows, next_cursor = device_service.list_devices(
            session, selector=selector or None, status=status or None, current_version=version or None,
            cursor=cursor, limit=queries.LIST_CAP,
        )  # fmt: skip
    except DomainError as exc:  # a mistyped selector is shown next to the filter, not a 400 page
        error = exc.detail
    filters = {"selector": selector, "status": status, "version": version}
    return render(
        request, "devices.html", partial, viewer=viewer, devices=rows, next_cursor=next_cursor, filters=filters,
        error=error, statuses=[s.value for s in DeviceStatus], versions=queries.known_versions(session),
        can_admin=viewer.role == Role.admin,
        events=queries.recent_events(session, rows),
    )  # fmt: skip


@router.get("/rollouts")
def rollouts_page(
    request: Request, session: SessionDep, viewer: ViewerCookieDep, partial: PartialQuery = None
) -> Response:
    if viewer is None:
        return sign_in_required(request, partial)
    return render(request, "rollouts.html", partial, viewer=viewer, rollouts=queries.recent_rollouts(session))


@router.get("/rollouts/{rollout_id}")
def rollout_page(
    rollout_id: str, request: Request, session: SessionDep, viewer: ViewerCookieDep, partial: PartialQuery = None
) -> Response:
    if viewer is None:
        return sign_in_required(request, partial)
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        return render(request, "missing.html", partial, status_code=404, viewer=viewer, what=f"rollout {rollout_id}")
    view = queries.rollout_view(session, rollout)
    return render(
        request,
        "rollout.html",
        partial,
        viewer=viewer,
        view=view,
        r=view.rollout,
        actions=allowed_actions(rollout) if viewer.role and viewer.role >= Role.operator else [],
        ordered=queries.metric_rows,
        check_value=queries.check_value,
    )


@router.get("/registry")
def registry_page(request: Request, session: SessionDep, viewer: ViewerCookieDep) -> Response:
    if viewer is None:
        return sign_in_required(request, None)
    can_operate = bool(viewer.role and viewer.role >= Role.operator)
    return render(
        request, "registry.html", None, viewer=viewer, models=queries.registry_view(session), can_operate=can_operate
    )


@router.get("/telemetry")
def telemetry_page(request: Request, viewer: ViewerCookieDep, range_key: RangeQuery = "15m") -> Response:
    if viewer is None:
        return sign_in_required(request, None)
    chosen = range_key if range_key in telemetry.RANGES_S else "15m"
    return render(request, "telemetry.html", None, viewer=viewer, ranges=list(telemetry.RANGES_S), chosen=chosen)


@router.get("/ui/api/telemetry")
def telemetry_series(
    session: SessionDep,
    viewer: ViewerCookieDep,
    range_key: RangeQuery = "15m",
    rollout: str | None = None,
) -> Any:
    """Chart data for the page scripts; authenticated by the dashboard cookie, read-only.

    With `rollout`, the rollout's model from a minute before it began (so the baseline shows)."""
    if viewer is None:
        return JSONResponse({"code": "unauthenticated", "detail": "sign in again"}, status_code=401)
    since, step_s = telemetry.since_for(range_key)
    model = None
    row = session.get(Rollout, rollout) if rollout else None
    if row is not None:
        since = (as_utc(row.created_at) or utcnow()) - timedelta(seconds=60)
        step_s = telemetry.step_for((utcnow() - since).total_seconds())
        owner = session.get(Model, row.model_id)
        model = owner.name if owner else None
    body: dict[str, Any] = {"since": since.isoformat()}  # version_series adds the step it used
    body.update(telemetry.version_series(session, since=since, step_s=step_s, model=model))
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/ui/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:  # a fixed list: no path from the URL ever reaches the filesystem
        return Response(status_code=404)
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": SECURITY_HEADERS["X-Content-Type-Options"]}
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=headers)
