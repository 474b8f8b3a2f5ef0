"""What devices report: telemetry windows (one row per device and sequence number) and events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field


class TelemetryRecord(SQLModel, table=True):
    __tablename__ = "telemetry_windows"
    # Deduplicated by message id: an agent's `seq` starts again at 0 when its process restarts.
    # PostgreSQL partitions the table by day of `window_end` (control_plane/telemetry/partitions.py),
    # and a partitioned table's keys must hold the partition key: a redelivered message carries the
    # same window_end, so (device, message id, window_end) still stores it once.
    __table_args__ = (
        sa.UniqueConstraint("device_id", "message_id", "window_end", name="uq_telemetry_windows_device_message"),
    )

    id: str = id_field()
    device_id: str = Field(max_length=36, index=True)
    message_id: str = Field(max_length=64)
    seq: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    window_start: datetime = Field(sa_type=sa.DateTime(timezone=True))  # type: ignore[call-overload]
    window_end: datetime = Field(sa_type=sa.DateTime(timezone=True), primary_key=True, index=True)  # type: ignore[call-overload]
    model: str | None = Field(default=None, max_length=128)
    version: str | None = Field(default=None, max_length=64, index=True)
    requests: int = 0
    errors: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    ttft_p95_ms: float | None = None
    tokens_per_s_p50: float | None = None
    rss_bytes: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    peak_rss_bytes: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    latency_histogram: dict[str, Any] = json_field()
    received_at: datetime = created_at_field()


class DeviceEvent(SQLModel, table=True):
    __tablename__ = "device_events"
    # Stored once per message id: a redelivery, or a replay of the ingest journal after a crash.
    __table_args__ = (sa.UniqueConstraint("device_id", "message_id", name="uq_device_events_device_message"),)

    id: str = id_field()
    device_id: str = Field(max_length=36, index=True)
    message_id: str | None = Field(default=None, max_length=64)  # None: stored before migration 0011
    kind: str = Field(max_length=64)
    detail: dict[str, Any] = json_field()
    created_at: datetime = created_at_field(index=True)
