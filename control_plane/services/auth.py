"""API tokens with roles, device credentials, and the principal a request acts as."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlmodel import Session, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.credentials import mosquitto_hash
from control_plane.models import ApiToken, Device, DeviceStatus, Role, as_utc, utcnow
from control_plane.security import API_TOKEN_PREFIX, hash_secret, new_secret, verify_secret
from control_plane.services.devices import complete_rotation


@dataclass(frozen=True)
class Principal:
    kind: str  # "token" | "device"
    id: str
    name: str
    role: Role | None = None  # devices have no operator role at all
    secret: str = ""  # devices: which secret they used ("current", "staged" or "previous")

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"


def create_token(session: Session, *, name: str, role: Role, created_by: str = "") -> tuple[ApiToken, str]:
    """Create a token; the plaintext is returned once and never stored."""
    plaintext = new_secret(API_TOKEN_PREFIX)
    token = ApiToken(
        name=name,
        role=role.name,
        token_hash=hash_secret(plaintext),
        prefix=plaintext[: len(API_TOKEN_PREFIX) + 6],
        created_by=created_by,
    )
    session.add(token)
    session.flush()
    return token, plaintext


def authenticate_token(session: Session, plaintext: str) -> Principal:
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(plaintext))).first()
    if token is None or token.revoked_at is not None:
        raise DomainError(ErrorCode.UNAUTHENTICATED, "the bearer token is unknown or revoked")
    return Principal(kind="token", id=token.id, name=token.name, role=Role[token.role])


def matching_secret(device: Device | None, secret: str) -> str | None:
    """Which of the device's secrets `secret` is: "current", "staged" (the one a pending rotation
    handed out last) or "previous" (until the rotation's grace period ends); None for none."""
    if device is None or device.status == DeviceStatus.decommissioned:
        return None
    if verify_secret(secret, device.secret_hash):
        return "current"
    if device.rotation_requested_at is not None and verify_secret(secret, device.staged_secret_hash):
        return "staged"
    expires = as_utc(device.previous_secret_expires_at)
    if expires is not None and expires > utcnow() and verify_secret(secret, device.previous_secret_hash):
        return "previous"
    return None


def admit_device(
    session: Session, device: Device | None, secret: str, *, broker_hash: Callable[[str], str] = mosquitto_hash
) -> str | None:
    """`matching_secret`; the staged secret's first use completes the rotation (caller commits)."""
    which = matching_secret(device, secret)
    if which == "staged" and device is not None:
        complete_rotation(session, device, secret, broker_hash=broker_hash)
    return which


def authenticate_device(
    session: Session, device_id: str, secret: str, *, broker_hash: Callable[[str], str] = mosquitto_hash
) -> Principal:
    device = session.get(Device, device_id)
    which = admit_device(session, device, secret, broker_hash=broker_hash)
    if device is None or which is None:
        raise DomainError(ErrorCode.UNAUTHENTICATED, "the device credential is unknown or revoked")
    return Principal(kind="device", id=device.id, name=device.id, secret=which)


def require_role(principal: Principal, needed: Role) -> None:
    if principal.role is None or principal.role < needed:
        raise DomainError(
            ErrorCode.FORBIDDEN,
            f"this endpoint needs the {needed.name} role",
            required_role=needed.name,
        )


def revoke_token(session: Session, token_id: str) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise DomainError(ErrorCode.TOKEN_NOT_FOUND, f"no token with id {token_id}")
    token.revoked_at = token.revoked_at or utcnow()
    session.add(token)
    return token
