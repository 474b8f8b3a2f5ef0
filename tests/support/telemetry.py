"""Helpers for telemetry tests: devices in the registry and known telemetry windows through the real ingest."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Device, DeviceStatus
from shared.messages import TelemetryMessage
from shared.telemetry import REQUEST_DURATION_BUCKETS, Histogram, Summary, SystemSample
from shared.topics import TopicKind

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # a fixed hour: bucket boundaries are known


def add_devices(engine: sa.Engine, *names: str, **fields: Any) -> list[str]:
    fields.setdefault("status", DeviceStatus.online)
    with Session(engine) as session:
        devices = [Device(name=name, **fields) for name in names]
        session.add_all(devices)
        session.commit()
        return [d.id for d in devices]


def histogram(counts_at: dict[int, int]) -> Histogram:
    """Bucket counts on the OpenTelemetry request-duration bounds: {bucket index: count}."""
    counts = [0] * (len(REQUEST_DURATION_BUCKETS) + 1)
    for index, count in counts_at.items():
        counts[index] = count
    return Histogram(bounds=REQUEST_DURATION_BUCKETS, counts=tuple(counts))


def window(
    device_id: str,
    end: datetime,
    counts_at: dict[int, int],
    *,
    errors: int = 0,
    version: str = "1",
    ttft_s: float | None = None,
    tokens_per_s: float | None = None,
    rss_mb: int = 100,
    seq: int = 0,
) -> DeviceMessage:
    requests = sum(counts_at.values())
    message = TelemetryMessage(
        message_id=uuid.uuid4().hex,
        device_id=device_id,
        seq=seq,
        window_start=end - timedelta(seconds=10),
        window_end=end,
        model="tiny",
        version=version,
        requests=requests,
        errors=errors,
        time_to_first_token_s=Summary(count=requests, p95=ttft_s),
        tokens_per_s=Summary(count=requests, p50=tokens_per_s),
        latency_histogram=histogram(counts_at),
        system=SystemSample(rss_bytes=rss_mb * 2**20, peak_rss_bytes=rss_mb * 2**20),
    )
    return DeviceMessage(device_id, TopicKind.TELEMETRY, message, "test/telemetry", datetime.now(UTC))


def ingest(engine: sa.Engine, messages: list[DeviceMessage]) -> IngestWriter:
    writer = IngestWriter(engine)
    writer(messages)
    return writer
