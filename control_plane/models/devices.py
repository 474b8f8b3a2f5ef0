"""Device registry: devices, their labels (a table, so selectors filter in SQL) and credentials."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field, ts_field


class DeviceStatus(StrEnum):
    pending_enrollment = "pending_enrollment"
    offline = "offline"
    online = "online"
    decommissioned = "decommissioned"


class Device(SQLModel, table=True):
    __tablename__ = "devices"

    id: str = id_field()
    name: str = Field(max_length=128, unique=True, index=True)
    status: str = Field(default=DeviceStatus.pending_enrollment, max_length=24, index=True)
    labels: dict[str, str] = json_field()  # copy of device_labels for display; filters use the table
    hardware: dict[str, Any] = json_field()
    enrollment_token_hash: str | None = Field(default=None, max_length=64, unique=True)
    enrollment_expires_at: datetime | None = ts_field()
    enrolled_at: datetime | None = ts_field()
    secret_hash: str | None = Field(default=None, max_length=64)
    # The secret as Mosquitto's password_file holds it (`$7$` PBKDF2-SHA512): the file is rebuilt from it.
    mqtt_password_hash: str | None = Field(default=None, max_length=160)
    # Credential rotation: the previous secret stays valid until it expires (the grace period).
    previous_secret_hash: str | None = Field(default=None, max_length=64)
    previous_secret_expires_at: datetime | None = ts_field()
    rotation_requested_at: datetime | None = ts_field()  # the device fetches a new secret when set
    rotation_grace_s: int | None = None
    # The new secret a pending rotation handed out last; its first use completes the rotation.
    staged_secret_hash: str | None = Field(default=None, max_length=64)
    last_seen: datetime | None = ts_field()
    current_model: str | None = Field(default=None, max_length=128)
    # Not indexed, so acknowledgements update the row in place (ADR 0007).
    current_version: str | None = Field(default=None, max_length=64)
    current_sha256: str | None = Field(default=None, max_length=64)
    phase: str | None = Field(default=None, max_length=32)  # from the device's state reports
    phase_reason: str | None = Field(default=None, max_length=2000)
    acked_message_id: str | None = Field(default=None, max_length=36)  # last desired message it acted on
    previous_version: str | None = Field(default=None, max_length=64)
    # The `report_seq` of the state report the columns above come from, and the rank (2 * seq, +1
    # offline) of the status report `status` comes from: ingest overwrites them only with a newer
    # report (NULL: unordered, any report overwrites).
    state_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    status_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = created_at_field(index=True)


class DeviceLabel(SQLModel, table=True):
    __tablename__ = "device_labels"

    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=36, ondelete="CASCADE")
    key: str = Field(primary_key=True, max_length=63)
    value: str = Field(max_length=63, index=True)
