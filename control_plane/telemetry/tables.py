"""Rollup tables: per-minute and per-hour aggregates of telemetry windows.

`telemetry_device_rollups` holds one row per (resolution, model, version, bucket, device);
`telemetry_version_rollups` the same summed over devices. Both keep the merged latency histogram
(fixed OpenTelemetry buckets, so merging is exact) instead of percentiles, which do not add up.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, json_field, ts_field
from control_plane.models.telemetry import TelemetryRecord


class RollupColumns(SQLModel):
    # Key order: per-version range scans filter on the first three and range over bucket_start.
    resolution_s: int = Field(primary_key=True)  # 60 or 3600
    model: str = Field(primary_key=True, max_length=128)  # "" when the window named none
    version: str = Field(primary_key=True, max_length=64)
    bucket_start: datetime = Field(primary_key=True, sa_type=sa.DateTime(timezone=True))  # type: ignore[call-overload]
    windows: int = 0
    requests: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    errors: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    latency_histogram: dict[str, Any] = json_field()  # {"bounds": [s...], "counts": [...]}, merged
    latency_max_ms: float | None = None
    # Request-weighted sums of each window's TTFT p95 and tokens/s p50: windows carry no TTFT or
    # throughput histogram in SQL, so the series report request-weighted means of those.
    ttft_ms_sum: float = 0.0
    ttft_requests: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    tokens_per_s_sum: float = 0.0
    tokens_per_s_requests: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    rss_bytes_sum: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    max_rss_bytes: int = Field(default=0, sa_type=sa.BigInteger)  # type: ignore[call-overload]
    updated_at: datetime = created_at_field()


class DeviceRollup(RollupColumns, table=True):
    __tablename__ = "telemetry_device_rollups"
    __table_args__ = (
        sa.Index("ix_telemetry_device_rollups_device", "device_id", "resolution_s", "bucket_start"),
        sa.Index("ix_telemetry_device_rollups_bucket", "resolution_s", "bucket_start"),
    )

    device_id: str = Field(primary_key=True, max_length=36)


class VersionRollup(RollupColumns, table=True):
    __tablename__ = "telemetry_version_rollups"
    __table_args__ = (sa.Index("ix_telemetry_version_rollups_bucket", "resolution_s", "bucket_start"),)


class RollupState(SQLModel, table=True):
    """Where the rollup job got to: raw rows received since `watermark` are rolled up next."""

    __tablename__ = "telemetry_rollup_state"

    name: str = Field(primary_key=True, max_length=32)
    watermark: datetime | None = ts_field()


# The rollup job finds new raw rows by arrival time (a device that was offline delivers old windows
# late); the index is declared here, next to its only user, and attaches to the raw table.
RECEIVED_AT_INDEX = sa.Index("ix_telemetry_windows_received_at", TelemetryRecord.__table__.c.received_at)  # type: ignore[attr-defined]
