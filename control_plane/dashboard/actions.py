"""Dashboard actions: promote, pause, resume and abort a rollout; deprecate or recall a version;
decommission a device. Each is a form POST that must come from the dashboard's own pages
(`SameOriginDep`: its Origin, else Referer, is this site), checks the signed-in token's role, is
audited under the token's name and redirects back to the page it came from.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

from control_plane.api.deps import SessionDep
from control_plane.dashboard.session import SameOriginDep, ViewerCookieDep, sign_in_required
from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.access import revoke_device_on_broker
from control_plane.models import Role
from control_plane.rollouts import actions, recall
from control_plane.services import audit, devices, registry
from control_plane.services.auth import Principal, require_role

router = APIRouter(include_in_schema=False)
VERSION_ACTIONS = {"deprecate": "deprecated", "recall": "recalled"}


def _refused(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status, headers={"Cache-Control": "no-store"})


def _act(request: Request, viewer: Principal | None, role: Role) -> Response | None:
    """Why this action must not run (sign-in, role), or None; SameOriginDep refused forgeries."""
    if viewer is None:
        return sign_in_required(request, None)
    try:
        require_role(viewer, role)
    except DomainError as exc:
        return _refused(403, exc.detail)
    return None


def _done(
    session: Any, viewer: Principal, request: Request, action: str, target: str, back: str, **detail: Any
) -> Response:
    audit.record(session, actor=viewer.actor, actor_id=viewer.id, action=action, target=target,
                 request_id=getattr(request.state, "request_id", ""), via="dashboard", **detail)  # fmt: skip
    session.commit()
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is not None:
        fleet.wake(tick=True)
    return RedirectResponse(back, status_code=303)


@router.post("/rollouts/{rollout_id}/actions/{action}")
def rollout_action(
    rollout_id: str, action: str, request: Request, session: SessionDep, viewer: ViewerCookieDep, _: SameOriginDep
) -> Response:
    if (refusal := _act(request, viewer, Role.operator)) is not None:
        return refusal
    assert viewer is not None
    try:
        rollout = actions.apply(session, rollout_id, action, viewer.actor)
    except DomainError as exc:
        return _refused(exc.status, exc.detail)
    return _done(session, viewer, request, f"rollout.{action}", rollout.id, f"/rollouts/{rollout.id}")


@router.post("/registry/{model_name}/{version}/{action}")
def version_action(
    model_name: str,
    version: str,
    action: str,
    request: Request,
    session: SessionDep,
    viewer: ViewerCookieDep,
    _: SameOriginDep,
) -> Response:
    if (refusal := _act(request, viewer, Role.operator)) is not None:
        return refusal
    assert viewer is not None
    status = VERSION_ACTIONS.get(action)
    try:
        if status is None:
            raise DomainError(ErrorCode.NOT_FOUND, f"unknown version action {action!r}; use deprecate or recall")
        model, row = registry.get_version(session, model_name, version)
        result = recall.change_status(session, model=model, version=row, status=status, actor=viewer.actor)
    except DomainError as exc:
        return _refused(exc.status, exc.detail)
    detail: dict[str, Any] = {"status": status}
    if result is not None:
        detail |= {"to_version": result.to_version, "rollout_id": result.rollout.id if result.rollout else None,
                   "devices": result.devices, "rolled_back": result.rolled_back}  # fmt: skip
    name = "version.recall" if result is not None else "version.status"
    return _done(session, viewer, request, name, f"{model_name}@{version}", "/registry", **detail)


@router.post("/devices/{device_id}/decommission")
def decommission_device(
    device_id: str, request: Request, session: SessionDep, viewer: ViewerCookieDep, _: SameOriginDep
) -> Response:
    if (refusal := _act(request, viewer, Role.admin)) is not None:
        return refusal
    assert viewer is not None
    try:
        device = devices.get_device(session, device_id)
        left = devices.decommission(session, device)
    except DomainError as exc:
        return _refused(exc.status, exc.detail)
    response = _done(session, viewer, request, "device.decommission", device.id, "/devices", rollouts_left=left)
    revoke_device_on_broker(request.app, device.id)
    return response
