"""`/v1/devices`: create (admin) with a one-time enrollment token, enroll (device), list and show."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from control_plane import releases
from control_plane.api.deps import AdminDep, MutationDep, PrincipalDep, SessionDep, ViewerDep
from control_plane.broker_access import grant_device_on_broker, revoke_device_on_broker
from control_plane.errors import DomainError
from control_plane.models import as_utc
from control_plane.schemas import DeviceCreate, DeviceCreated, DevicePublic, Page
from control_plane.services import devices
from control_plane.services.auth import Principal
from shared.enrollment import EnrollRequest, EnrollResponse

router = APIRouter(prefix="/v1/devices", tags=["devices"])


@router.post("", status_code=201, response_model=DeviceCreated)
def create_device(spec: DeviceCreate, principal: AdminDep, mutation: MutationDep) -> Any:
    """Register a device; the response holds its enrollment token, shown this once."""
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    device, token = devices.create_device(
        mutation.session,
        name=spec.name,
        labels=spec.labels,
        created_by=principal.actor,
        token_ttl_s=mutation.settings.enrollment_token_ttl_s,
    )
    mutation.audit(principal, "device.create", device.id, name=device.name)
    body = DeviceCreated.model_validate(
        {
            **device.model_dump(),
            "enrollment_token": token,
            "enrollment_expires_at": device.enrollment_expires_at,
        }
    )
    mutation.commit(principal, 201, body)
    return body


@router.post("/enroll", status_code=201, response_model=EnrollResponse)
def enroll_device(request: EnrollRequest, mutation: MutationDep) -> Any:
    """Exchange a one-time enrollment token for the device credential. No bearer token needed."""
    device, secret = devices.enroll(mutation.session, request)
    mutation.session.flush()
    mutation.audit(Principal("device", device.id, device.id), "device.enroll", device.id)
    mutation.session.commit()
    settings = mutation.settings
    grant_device_on_broker(mutation.request.app, device)
    return EnrollResponse(
        device_id=device.id,
        device_secret=secret,
        mqtt_url=getattr(mutation.request.app.state, "device_mqtt_url", None),
        topic_prefix=settings.mqtt_topic_prefix,
        root_metadata=signer.chain if (signer := releases.current()) is not None else None,
    )


@router.get("", response_model=Page[DevicePublic])
def list_devices(
    session: SessionDep,
    _: ViewerDep,
    selector: str | None = Query(None, description="label selector, e.g. region=eu,tier=canary"),
    status: str | None = None,
    current_version: str | None = None,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    rows, next_cursor = devices.list_devices(
        session, selector=selector, status=status, current_version=current_version, cursor=cursor, limit=limit
    )
    return Page[DevicePublic](data=[DevicePublic.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/me", response_model=DevicePublic)
def who_am_i(principal: PrincipalDep, session: SessionDep) -> Any:
    """A device reads its own record (labels, desired version)."""
    if principal.kind != "device":
        raise DomainError("forbidden", "only a device credential can ask for /v1/devices/me")
    return DevicePublic.model_validate(devices.get_device(session, principal.id))


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: ViewerDep) -> Any:
    return DevicePublic.model_validate(devices.get_device(session, device_id))


@router.post("/{device_id}/enrollment-token", status_code=201, response_model=DeviceCreated)
def reissue_enrollment_token(device_id: str, principal: AdminDep, mutation: MutationDep) -> Any:
    """A new one-time token (the device's current credential stops working)."""
    device = devices.get_device(mutation.session, device_id)
    token = devices.reissue_enrollment_token(mutation.session, device, mutation.settings.enrollment_token_ttl_s)
    mutation.audit(principal, "device.reissue_token", device.id)
    body = DeviceCreated.model_validate(
        {
            **device.model_dump(),
            "enrollment_token": token,
            "enrollment_expires_at": as_utc(device.enrollment_expires_at),
        }
    )
    mutation.commit(principal, 201, body)
    revoke_device_on_broker(mutation.request.app, device.id)  # the old credential's connection too
    return body
