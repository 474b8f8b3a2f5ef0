"""Device registry: creation with a one-time enrollment token, enrollment, listing by selector."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.credentials import mosquitto_hash
from control_plane.models import (
    DesiredStateRow,
    Device,
    DeviceLabel,
    DeviceStatus,
    RolloutDevice,
    as_utc,
    utcnow,
)
from control_plane.schemas import MAX_LABELS
from control_plane.security import ENROLLMENT_TOKEN_PREFIX, hash_secret, new_secret
from control_plane.services import pagination
from control_plane.services.selectors import parse_selector, selector_clauses
from shared.enrollment import EnrollRequest


def create_device(
    session: Session, *, name: str, labels: dict[str, str], created_by: str, token_ttl_s: int
) -> tuple[Device, str]:
    """Create a device awaiting enrollment; returns it with the one-time enrollment token."""
    if session.exec(select(Device).where(Device.name == name)).first() is not None:
        raise DomainError(ErrorCode.DEVICE_EXISTS, f"a device named {name!r} already exists")
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    device = Device(
        name=name,
        labels=labels,
        created_by=created_by,
        enrollment_token_hash=hash_secret(token),
        enrollment_expires_at=utcnow() + timedelta(seconds=token_ttl_s),
    )
    session.add(device)
    try:
        session.flush()
    except IntegrityError as exc:
        raise DomainError(ErrorCode.DEVICE_EXISTS, f"a device named {name!r} already exists") from exc
    set_labels(session, device, labels)
    return device, token


def set_labels(session: Session, device: Device, labels: dict[str, str]) -> None:
    for row in session.exec(select(DeviceLabel).where(DeviceLabel.device_id == device.id)).all():
        session.delete(row)
    session.flush()
    for key, value in labels.items():
        session.add(DeviceLabel(device_id=device.id, key=key, value=value))
    device.labels = dict(labels)
    session.add(device)
    session.flush()


def update_device(session: Session, device: Device, *, name: str | None, labels: dict[str, str] | None) -> None:
    """Rename and/or replace the labels of one device."""
    if name is not None and name != device.name:
        if session.exec(select(Device).where(Device.name == name)).first() is not None:
            raise DomainError(ErrorCode.DEVICE_EXISTS, f"a device named {name!r} already exists")
        device.name = name
        session.add(device)
        try:
            session.flush()
        except IntegrityError as exc:
            raise DomainError(ErrorCode.DEVICE_EXISTS, f"a device named {name!r} already exists") from exc
    if labels is not None:
        set_labels(session, device, labels)


def relabel(session: Session, *, selector: str, set_: dict[str, str], remove: list[str]) -> int:
    """Every device the selector matches gets `set_` and loses `remove`; returns how many matched."""
    stmt = select(Device.id, Device.labels)
    for clause in selector_clauses(parse_selector(selector)):
        stmt = stmt.where(clause)
    matched = {device_id: dict(labels or {}) for device_id, labels in session.exec(stmt).all()}
    if not matched:
        return 0
    merged = {d: {k: v for k, v in labels.items() if k not in remove} | set_ for d, labels in matched.items()}
    over = [d for d, labels in merged.items() if len(labels) > MAX_LABELS]
    if over:  # checked before any change: a device keeps at most MAX_LABELS labels
        raise DomainError(ErrorCode.TOO_MANY_LABELS, f"{len(over)} device(s) would have over {MAX_LABELS} labels",
                          devices=over[:50])  # fmt: skip
    ids, keys = list(matched), set(set_) | set(remove)
    label_table = DeviceLabel.__table__  # type: ignore[attr-defined]
    device_table = Device.__table__  # type: ignore[attr-defined]
    for start in range(0, len(ids), 1000):  # bounded IN lists
        chunk = ids[start : start + 1000]
        session.execute(sa.delete(label_table).where(label_table.c.device_id.in_(chunk), label_table.c.key.in_(keys)))
    rows = [{"device_id": d, "key": k, "value": v} for d in ids for k, v in set_.items()]
    if rows:
        session.execute(sa.insert(label_table), rows)
    updates = [{"b_id": d, "b_labels": labels} for d, labels in merged.items()]
    by_id = device_table.c.id == sa.bindparam("b_id")
    session.execute(sa.update(device_table).where(by_id).values(labels=sa.bindparam("b_labels")), updates)
    session.expire_all()
    return len(ids)


def decommission(session: Session, device: Device) -> int:
    """Retire a device: its credential and enrollment token stop working, it leaves every rollout
    (their counts no longer include it) and has no desired state. Returns the rollouts it left."""
    if device.status == DeviceStatus.decommissioned:
        raise DomainError(ErrorCode.INVALID_STATE, f"device {device.name!r} is already decommissioned")
    device.status = DeviceStatus.decommissioned
    device.secret_hash = device.mqtt_password_hash = device.previous_secret_hash = None
    device.enrollment_token_hash = device.enrollment_expires_at = device.rotation_requested_at = None
    device.staged_secret_hash = None
    session.add(device)
    members = RolloutDevice.__table__  # type: ignore[attr-defined]
    desired = DesiredStateRow.__table__  # type: ignore[attr-defined]
    left = session.execute(sa.delete(members).where(members.c.device_id == device.id)).rowcount  # type: ignore[attr-defined]
    session.execute(sa.delete(desired).where(desired.c.device_id == device.id))
    session.flush()
    return int(left or 0)


def request_rotation(session: Session, device: Device, grace_s: int) -> None:
    """Ask the device to fetch a new secret; its current one works `grace_s` longer after that."""
    if device.status == DeviceStatus.decommissioned or device.secret_hash is None:
        raise DomainError(ErrorCode.INVALID_STATE, f"device {device.name!r} has no credential to rotate")
    device.rotation_requested_at = utcnow()
    device.rotation_grace_s = grace_s
    device.staged_secret_hash = None
    session.add(device)
    session.flush()


def stage_secret(session: Session, device: Device) -> str:
    """A new secret for the device (returned once), staged in place of any earlier one until the
    device first uses it; the current secret keeps working meanwhile."""
    if device.rotation_requested_at is None or device.secret_hash is None:
        raise DomainError(ErrorCode.INVALID_STATE, "no credential rotation was requested for this device")
    secret = new_secret()
    device.staged_secret_hash = hash_secret(secret)
    session.add(device)
    session.flush()
    return secret


def complete_rotation(
    session: Session, device: Device, secret: str, *, broker_hash: Callable[[str], str] = mosquitto_hash
) -> None:
    """The staged `secret` becomes current; the previous one expires after the grace period.
    `broker_hash`: how the broker checks it (control_plane.fleet.access.broker_password_hash)."""
    device.previous_secret_hash = device.secret_hash
    device.previous_secret_expires_at = utcnow() + timedelta(seconds=device.rotation_grace_s or 0)
    device.secret_hash = device.staged_secret_hash
    device.mqtt_password_hash = broker_hash(secret)
    device.staged_secret_hash = device.rotation_requested_at = device.rotation_grace_s = None
    session.add(device)
    session.flush()


def reissue_enrollment_token(session: Session, device: Device, token_ttl_s: int) -> str:
    """A fresh token for a device that lost its credential; the old credential stops working."""
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    device.enrollment_token_hash = hash_secret(token)
    device.enrollment_expires_at = utcnow() + timedelta(seconds=token_ttl_s)
    device.secret_hash = None
    device.mqtt_password_hash = None
    device.previous_secret_hash = device.rotation_requested_at = None  # no grace for a lost credential
    device.staged_secret_hash = None
    device.status = DeviceStatus.pending_enrollment
    session.add(device)
    session.flush()
    return token


def enroll(
    session: Session, request: EnrollRequest, *, broker_hash: Callable[[str], str] = mosquitto_hash
) -> tuple[Device, str]:
    """Exchange an enrollment token, once, for a device credential (id + secret); the broker
    gets the secret's `broker_hash` (control_plane.fleet.access.broker_password_hash)."""
    token_hash = hash_secret(request.enrollment_token)
    device = session.exec(select(Device).where(Device.enrollment_token_hash == token_hash)).first()
    if device is None:
        raise DomainError(ErrorCode.ENROLLMENT_TOKEN_INVALID, "the enrollment token is not known")
    if device.enrolled_at is not None and device.secret_hash is not None:
        raise DomainError(ErrorCode.ENROLLMENT_TOKEN_USED, "this enrollment token was already used")
    expires = as_utc(device.enrollment_expires_at)
    if expires is not None and expires < utcnow():
        raise DomainError(ErrorCode.ENROLLMENT_TOKEN_EXPIRED, "the enrollment token has expired; ask for a new one")
    secret = new_secret()
    # One conditional UPDATE claims the token: of concurrent enrollments, the row lock lets one
    # through and the others find the secret already set.
    claimed = session.execute(
        sa.update(Device)
        .where(
            col(Device.id) == device.id,
            col(Device.enrollment_token_hash) == token_hash,
            col(Device.secret_hash).is_(None),
        )
        .values(
            secret_hash=hash_secret(secret),
            mqtt_password_hash=broker_hash(secret),
            enrolled_at=utcnow(),
            status=DeviceStatus.offline,
            hardware=request.hardware.model_dump(exclude={"schema_version"}),
            # A (re)enrolled device may order its reports from scratch (a reflashed one has lost
            # its clock's state): what it reported before no longer outranks it.
            state_seq=None,
            status_seq=None,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise DomainError(ErrorCode.ENROLLMENT_TOKEN_USED, "this enrollment token was already used")
    session.refresh(device)
    return device, secret


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        device = session.exec(select(Device).where(Device.name == device_id)).first()
    if device is None:
        raise DomainError(ErrorCode.DEVICE_NOT_FOUND, f"no device with id or name {device_id!r}")
    return device


def list_devices(
    session: Session,
    *,
    selector: str | None,
    status: str | None,
    current_version: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Device], str | None]:
    stmt = select(Device)
    for clause in selector_clauses(parse_selector(selector)):
        stmt = stmt.where(clause)
    if status:
        stmt = stmt.where(Device.status == status)
    if current_version:
        stmt = stmt.where(Device.current_version == current_version)
    stmt = pagination.apply_page(stmt, Device.created_at, Device.id, cursor, limit)
    return pagination.split_page(list(session.exec(stmt).all()), limit)
