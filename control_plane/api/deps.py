"""Dependency aliases: routes declare what they need (`SessionDep`, `OperatorDep`, ...) and build nothing."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator
from sqlmodel import Session

from control_plane.api.ratelimit import RateLimiter
from control_plane.config import Settings
from control_plane.errors import DomainError, ErrorCode
from control_plane.fleet.access import broker_password_hash, complete_rotation_on_broker
from control_plane.models import ApiToken, Device, Role, as_utc, utcnow
from control_plane.services import audit, idempotency
from control_plane.services.auth import Principal, authenticate_device, authenticate_token, require_role
from control_plane.storage import LocalBlobStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_engine(request: Request) -> sa.Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


def get_session(engine: Annotated[sa.Engine, Depends(get_engine)]) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


def rate_limiter(request: Request) -> RateLimiter:
    return request.app.state.rate_limiter  # type: ignore[no-any-return]


def get_blob_store(request: Request) -> LocalBlobStore:
    return request.app.state.blob_store  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobStoreDep = Annotated[LocalBlobStore, Depends(get_blob_store)]
RateLimiterDep = Annotated[RateLimiter, Depends(rate_limiter)]


def _principal(request: Request, session: Session) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        principal = authenticate_token(session, value.strip())
        touch_token(session, principal.id)
        return principal
    if scheme == "basic" and value:
        try:
            device_id, _, secret = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise DomainError(ErrorCode.UNAUTHENTICATED, "malformed Basic credentials") from exc
        principal = authenticate_device(session, device_id, secret, broker_hash=broker_password_hash(request.app))
        if principal.secret == "staged":  # its first use completed the rotation
            session.commit()
            if (device := session.get(Device, principal.id)) is not None:
                complete_rotation_on_broker(request.app, device)
        return principal
    raise DomainError(ErrorCode.UNAUTHENTICATED, "send 'Authorization: Bearer <token>' (operators) or Basic (devices)")


def touch_token(session: Session, token_id: str) -> None:
    """Record that the token was used (the API and the dashboard both call this)."""
    # At most once a minute, so read-heavy dashboards do not turn every GET into a write.
    token = session.get(ApiToken, token_id)
    last = as_utc(token.last_used_at) if token else None
    if token is not None and (last is None or last < utcnow() - timedelta(seconds=60)):
        token.last_used_at = utcnow()
        session.add(token)
        session.commit()


def authenticate_request(request: Request, session: Session) -> Principal:
    """The request's principal, checked once per request; repeated failures from one address get a 429."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    limiter = rate_limiter(request)
    limiter.check(request, "auth")
    try:
        principal = _principal(request, session)
    except DomainError:
        limiter.charge(request, "auth")
        raise
    request.state.principal = principal
    request.state.actor = principal.actor
    return principal


def any_principal(request: Request, session: SessionDep) -> Principal:
    return authenticate_request(request, session)


def _role_dependency(role: Role) -> Any:
    def dependency(principal: Annotated[Principal, Depends(any_principal)]) -> Principal:
        require_role(principal, role)
        return principal

    return Depends(dependency)


PrincipalDep = Annotated[Principal, Depends(any_principal)]
ViewerDep = Annotated[Principal, _role_dependency(Role.viewer)]
OperatorDep = Annotated[Principal, _role_dependency(Role.operator)]
AdminDep = Annotated[Principal, _role_dependency(Role.admin)]


class Mutation:
    """What a mutating route needs besides its session: audit and Idempotency-Key handling."""

    def __init__(self, request: Request, session: SessionDep, settings: SettingsDep) -> None:
        self.request = request
        self.session = session
        self.settings = settings
        self.key = request.headers.get("idempotency-key")
        self._print: str | None = None

    @property
    def request_id(self) -> str:
        return getattr(self.request.state, "request_id", "")

    def replay(self, principal: Principal, body: Any) -> JSONResponse | None:
        """The stored response when this Idempotency-Key was seen with the same body."""
        if not self.key:
            return None
        payload = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        self._print = idempotency.fingerprint(self.request.method, self.request.url.path, payload)
        stored = idempotency.lookup(
            self.session,
            key=self.key,
            principal=idempotency.scope(principal),
            print_=self._print,
            ttl_s=self.settings.idempotency_ttl_s,
        )
        if stored is None:
            return None
        status, response = stored
        return JSONResponse(response, status_code=status, headers={"Idempotent-Replayed": "true"})

    def audit(self, principal: Principal, action: str, target: str, **detail: Any) -> None:
        audit.record(
            self.session,
            actor=principal.actor,
            actor_id=principal.id,
            action=action,
            target=target,
            request_id=self.request_id,
            **detail,
        )

    def commit(self, principal: Principal, status_code: int, response: Any, secrets: tuple[str, ...] = ()) -> None:
        """Commit the change; with an Idempotency-Key, keep the response less its `secrets` fields for replays."""
        if self.key and self._print:
            body = jsonable_encoder(response)
            body.update(dict.fromkeys(secrets))  # a secret is shown once: a replay says null, never the plaintext
            idempotency.store(
                self.session,
                key=self.key,
                principal=idempotency.scope(principal),
                print_=self._print,
                status_code=status_code,
                body=body,
            )
        self.session.commit()


MutationDep = Annotated[Mutation, Depends()]


def _iso_instant(value: Any) -> Any:
    # A time in a query is ISO 8601 text, as the schema says; pydantic alone also reads a bare number as Unix seconds.
    if isinstance(value, str) and not re.match(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("expected an ISO 8601 date-time such as 2026-12-06T08:00:00Z")
    return value


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_instant)]
