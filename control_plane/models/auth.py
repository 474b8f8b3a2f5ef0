"""Operator API tokens, the audit trail and stored idempotent responses."""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field, ts_field


class Role(IntEnum):
    """Ordered: a role may do everything the roles below it may."""

    viewer = 1
    operator = 2
    admin = 3


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: str = id_field()
    name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)  # shown in listings so a leaked token can be identified
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = created_at_field()
    last_used_at: datetime | None = ts_field()
    revoked_at: datetime | None = ts_field()


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: str = id_field()
    actor: str = Field(max_length=160)  # "token:<name>" or "device:<id>"
    actor_id: str = Field(default="", max_length=36)  # the token's or device's id: names can repeat
    action: str = Field(max_length=64)  # e.g. "model.create"
    target: str = Field(default="", max_length=300)
    request_id: str = Field(default="", max_length=64)
    detail: dict[str, Any] = json_field()
    created_at: datetime = created_at_field(index=True)


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_records"

    key: str = Field(primary_key=True, max_length=200)
    principal: str = Field(primary_key=True, max_length=160)
    fingerprint: str = Field(max_length=64)
    status_code: int
    response: dict[str, Any] = json_field()
    created_at: datetime = created_at_field(index=True)


class DashboardSession(SQLModel, table=True):
    """A dashboard sign-in: the cookie holds a random id, the table only its hash and the token's id."""

    __tablename__ = "dashboard_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    token_id: str = Field(foreign_key="api_tokens.id", max_length=36, index=True, ondelete="CASCADE")
    created_at: datetime = created_at_field()
    expires_at: datetime = Field(sa_type=sa.DateTime(timezone=True), sa_column_kwargs={"nullable": False}, index=True)  # type: ignore[call-overload]
