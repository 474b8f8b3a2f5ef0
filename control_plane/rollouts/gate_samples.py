"""What a stage's gates are decided on, read from the database: the stage's telemetry, its
baseline's, the members not online and the golden reports (`gates.decide` reads none of it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.db import bulk
from control_plane.models import Device, DeviceStatus, TelemetryRecord
from control_plane.rollouts import golden_gate
from control_plane.rollouts import members as members_
from control_plane.rollouts.gates import LATENCY_BOUNDS, Sample, StageSamples
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates
from control_plane.rollouts.robust import DeviceSample


def collect(
    session: Session,
    *,
    rollout_id: str,
    gates: Gates,
    members: list[Member],
    new_version: str,
    baseline_version: str | None,
    baseline_device_ids: list[str],
    stage_since: datetime,
    baseline_since: datetime,
) -> StageSamples:
    """The samples of the stage's `members` (those given the new version so far) since `stage_since`,
    and of the baseline devices on the baseline version since `baseline_since`."""
    active = [m.device_id for m in members if m.status == "active"]
    not_online = _not_online(session, rollout_id)
    golden = None
    if gates.min_golden_pass_rate is not None:
        golden = golden_gate.collect(
            session,
            rollout_id=rollout_id,
            active_device_ids=active,
            new_version=new_version,
            baseline_version=baseline_version,
            baseline_device_ids=baseline_device_ids,
        )
    return StageSamples(
        members=tuple(members),
        offline=tuple(m.device_id for m in members if m.status != "incompatible" and m.device_id in not_online),
        new_version=new_version,
        new=telemetry(session, active, new_version, stage_since, gates.warmup_windows),
        baseline_version=baseline_version,
        baseline=telemetry(session, baseline_device_ids, baseline_version, baseline_since),
        baseline_devices=len(baseline_device_ids),
        golden=golden,
    )


def _not_online(session: Session, rollout_id: str) -> set[str]:
    """The rollout's members whose device is not online."""
    devices = Device.__table__.c  # type: ignore[attr-defined]  # table columns: see controller.DEVICES
    # Only the exceptions, joined through the rollout's members, not every member's status
    # (docs/performance.md#controller-ticks).
    member = members_.TABLE.c
    stmt = (
        sa.select(devices.id)
        .join_from(members_.TABLE, Device.__table__, devices.id == member.device_id)  # type: ignore[attr-defined]
        .where(member.rollout_id == rollout_id, devices.status != DeviceStatus.online)
    )
    return set(session.execute(stmt).scalars().all())


def telemetry(
    session: Session, device_ids: list[str], version: str | None, since: datetime, warmup_windows: int = 0
) -> Sample:
    """Telemetry of `version` on these devices since `since`, skipping each device's first
    `warmup_windows` windows (a fresh model's first window holds the swap and cold caches)."""
    if not device_ids or version is None:
        return Sample()
    t = TelemetryRecord.__table__  # type: ignore[attr-defined]
    # Only the columns a gate reads: whole ORM rows cost a JSON decode and an object per window.
    columns = (t.c.device_id, t.c.requests, t.c.errors, t.c.rss_bytes, t.c.peak_rss_bytes, t.c.latency_p95_ms,
               t.c.latency_histogram)  # fmt: skip
    rows: list[Any] = []
    for clause in bulk.matching(session, t.c.device_id, device_ids):
        stmt = sa.select(*columns).where(clause, t.c.version == version, t.c.window_end >= since)
        rows.extend(session.execute(stmt.order_by(t.c.device_id, t.c.seq)).all())
    if warmup_windows:
        per_device: dict[str, int] = {}
        kept = []
        for row in rows:
            per_device[row.device_id] = per_device.get(row.device_id, 0) + 1
            if per_device[row.device_id] > warmup_windows:
                kept.append(row)
        rows = kept
    return _added_up(rows)


def _added_up(rows: list[Any]) -> Sample:
    """Telemetry rows (in device and sequence order) added up per device."""
    sample = Sample()
    for row in rows:
        device = sample.devices.setdefault(row.device_id, DeviceSample())
        device.windows += 1
        requests = max(row.requests, 0)  # rows stored before the wire schema bounded counts
        device.requests += requests
        device.errors += min(max(row.errors, 0), requests)
        device.max_rss_bytes = max(device.max_rss_bytes, row.peak_rss_bytes or row.rss_bytes)
        histogram = row.latency_histogram
        if histogram.get("counts"):
            # The agents' layout, not the first row's: one device must not pick what is merged.
            if list(histogram["bounds"]) == LATENCY_BOUNDS:  # another cannot be merged bucket by bucket
                sample.bounds = LATENCY_BOUNDS
                counts = device.counts = device.counts or [0.0] * (len(LATENCY_BOUNDS) + 1)
                for i, c in enumerate(histogram["counts"]):
                    counts[i] += max(c, 0)
        elif row.latency_p95_ms is not None and row.requests:
            device.p95_sum += row.latency_p95_ms * row.requests
            device.p95_requests += row.requests
    return sample
