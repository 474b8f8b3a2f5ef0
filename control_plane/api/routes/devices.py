"""`/v1/devices`: create (admin) with a one-time enrollment token, enroll (device), list and show."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Query, Request

from control_plane.api.deps import (
    AdminDep,
    MutationDep,
    OperatorDep,
    PrincipalDep,
    RateLimiterDep,
    SessionDep,
    ViewerDep,
)
from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.access import broker_password_hash, grant_device_on_broker, revoke_device_on_broker
from control_plane.models import as_utc, utcnow
from control_plane.schemas import (
    DeviceCreate,
    DeviceCreated,
    DevicePublic,
    DeviceRelabel,
    DeviceUpdate,
    Page,
    RelabelResult,
    RotationRequest,
)
from control_plane.services import devices
from control_plane.services.auth import Principal
from control_plane.trust import releases
from control_plane.trust.device_ca import issue_device_certificate, renew_device_certificate
from shared.enrollment import (
    CertificateRequest,
    CertificateResponse,
    CredentialRotation,
    EnrollRequest,
    EnrollResponse,
)

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
    mutation.commit(principal, 201, body, secrets=("enrollment_token",))
    return body


@router.post("/enroll", status_code=201, response_model=EnrollResponse)
def enroll_device(request: EnrollRequest, mutation: MutationDep, limiter: RateLimiterDep) -> Any:
    """Exchange a one-time enrollment token for the device credential. No bearer token needed."""
    limiter.check(mutation.request, "enroll")
    try:
        broker_hash = broker_password_hash(mutation.request.app)
        device, secret = devices.enroll(mutation.session, request, broker_hash=broker_hash)
    except DomainError:
        limiter.charge(mutation.request, "enroll")
        raise
    certificate = issue_device_certificate(mutation.request.app, device.id, request.csr_pem)  # before commit
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
        client_certificate_pem=certificate,
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
        raise DomainError(ErrorCode.FORBIDDEN, "only a device credential can ask for /v1/devices/me")
    return DevicePublic.model_validate(devices.get_device(session, principal.id))


@router.post("/me/certificate", status_code=201, response_model=CertificateResponse)
def renew_certificate(request: CertificateRequest, principal: PrincipalDep, mutation: MutationDep) -> Any:
    """A device renews its X.509 identity once half its lifetime is gone; the old certificate stays
    valid (a device holds at most two: a third revokes the oldest)."""
    if principal.kind != "device":
        raise DomainError(ErrorCode.FORBIDDEN, "only a device credential can renew its certificate")
    certificate = renew_device_certificate(mutation.request.app, principal.id, request.csr_pem)
    if certificate is None:
        raise DomainError(ErrorCode.DEVICE_CERTIFICATES_DISABLED, "this control plane issues no device certificates")
    mutation.audit(principal, "device.certificate_renew", principal.id)
    mutation.session.commit()
    return CertificateResponse(client_certificate_pem=certificate)


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
    mutation.commit(principal, 201, body, secrets=("enrollment_token",))
    revoke_device_on_broker(mutation.request.app, device.id)  # the old credential's connection too
    return body


def _wake(request: Request) -> None:
    """Labels decide rollout membership: the controller looks again now, not at its next tick."""
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is not None:
        fleet.wake(tick=True)


@router.patch("/{device_id}", response_model=DevicePublic)
def update_device(
    device_id: str, update: DeviceUpdate, request: Request, principal: OperatorDep, mutation: MutationDep
) -> Any:
    """Rename a device or replace its labels (which may move it into or out of a rollout's selector)."""
    device = devices.get_device(mutation.session, device_id)
    before = dict(device.labels)
    devices.update_device(mutation.session, device, name=update.name, labels=update.labels)
    changed = update.model_dump(exclude_none=True)
    mutation.audit(principal, "device.update", device.id, **changed, labels_before=before)
    body = DevicePublic.model_validate(device)
    mutation.commit(principal, 200, body)
    _wake(request)
    return body


@router.post("/relabel", response_model=RelabelResult)
def relabel_devices(spec: DeviceRelabel, request: Request, principal: OperatorDep, mutation: MutationDep) -> Any:
    """Set and remove labels on every device a selector matches; says how many matched."""
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    matched = devices.relabel(mutation.session, selector=spec.selector, set_=spec.set, remove=spec.remove)
    mutation.audit(principal, "device.relabel", spec.selector, matched=matched, set=spec.set, remove=spec.remove)
    body = RelabelResult(selector=spec.selector, matched=matched, set=spec.set, remove=spec.remove)
    mutation.commit(principal, 200, body)
    _wake(request)
    return body


@router.post("/{device_id}/decommission", response_model=DevicePublic)
def decommission_device(device_id: str, request: Request, principal: AdminDep, mutation: MutationDep) -> Any:
    """Retire a device: HTTP refuses its credential at once, the broker closes its connection, it
    leaves every rollout; only a new enrollment token (reissue-token) brings it back."""
    device = devices.get_device(mutation.session, device_id)
    left = devices.decommission(mutation.session, device)
    mutation.audit(principal, "device.decommission", device.id, name=device.name, rollouts_left=left)
    body = DevicePublic.model_validate(device)
    mutation.commit(principal, 200, body)
    revoke_device_on_broker(request.app, device.id)
    _wake(request)
    return body


@router.post("/{device_id}/rotate-credential", status_code=202, response_model=DevicePublic)
def rotate_credential(device_id: str, spec: RotationRequest, principal: AdminDep, mutation: MutationDep) -> Any:
    """Ask the device's agent to fetch a new secret; the old one works `grace_s` after it does."""
    device = devices.get_device(mutation.session, device_id)
    devices.request_rotation(mutation.session, device, spec.grace_s)
    mutation.audit(principal, "device.rotate_credential", device.id, grace_s=spec.grace_s)
    body = DevicePublic.model_validate(device)
    mutation.commit(principal, 202, body)
    return body


@router.post("/me/credential", response_model=CredentialRotation)
def fetch_new_credential(principal: PrincipalDep, mutation: MutationDep) -> Any:
    """The device (Basic auth, its current secret) takes the new secret an operator's rotation asked
    for. Each fetch replaces the last one's secret; the first request made with one completes the
    rotation. Whoever holds a leaked current secret can fetch too: against a leak, reissue the
    enrollment token or decommission the device instead."""
    if principal.kind != "device":
        raise DomainError(ErrorCode.FORBIDDEN, "only a device credential can rotate itself")
    if principal.secret != "current":
        raise DomainError(ErrorCode.FORBIDDEN, "only the device's current secret can fetch a new one")
    device = devices.get_device(mutation.session, principal.id)
    secret = devices.stage_secret(mutation.session, device)
    grace_ends = utcnow() + timedelta(seconds=device.rotation_grace_s or 0)  # at the earliest
    mutation.audit(principal, "device.credential_fetched", device.id)
    mutation.session.commit()
    return CredentialRotation(device_id=device.id, device_secret=secret, previous_valid_until=grace_ends)
