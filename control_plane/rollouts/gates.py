"""Gate evaluation over the telemetry of a stage's devices, against limits and the baseline.

Percentiles across devices and windows come from merged fixed-bucket histograms (the agents use
the OpenTelemetry gen_ai request-duration buckets), interpolated inside the bucket; a window
without a histogram falls back to its own exact p95, weighted by its request count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane import bulk
from control_plane.models import Device, DeviceStatus, TelemetryRecord
from control_plane.rollouts import golden_gate
from control_plane.rollouts import members as members_
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


@dataclass
class Sample:
    requests: int = 0
    errors: int = 0
    max_rss_bytes: int = 0
    p95_ms: float | None = None
    windows: int = 0


@dataclass
class GateResult:
    result: str
    details: dict[str, Any] = field(default_factory=dict)


def merged_percentile(histograms: list[dict[str, Any]], q: float) -> float | None:
    """q-quantile (0..1) in the histograms' unit, from summed bucket counts."""
    if not histograms:
        return None
    bounds = list(histograms[0]["bounds"])
    counts = [0] * (len(bounds) + 1)
    for hist in histograms:
        if list(hist["bounds"]) != bounds:
            continue  # a different bucket layout cannot be merged bucket by bucket
        for i, c in enumerate(hist["counts"]):
            counts[i] += int(c)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i] if i < len(bounds) else bounds[-1] * 2
            return float(lower + (upper - lower) * ((rank - seen) / c))
        seen += c
    return float(bounds[-1])


def collect(
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
    sample = Sample(windows=len(rows))
    histograms = []
    weighted, weight = 0.0, 0
    for row in rows:
        sample.requests += row.requests
        sample.errors += row.errors
        sample.max_rss_bytes = max(sample.max_rss_bytes, row.peak_rss_bytes or row.rss_bytes)
        if row.latency_histogram.get("counts"):
            histograms.append(row.latency_histogram)
        elif row.latency_p95_ms is not None and row.requests:
            weighted += row.latency_p95_ms * row.requests
            weight += row.requests
    p95_s = merged_percentile(histograms, 0.95)
    if p95_s is not None:
        sample.p95_ms = p95_s * 1000
    elif weight:
        sample.p95_ms = weighted / weight
    return sample


def _limit(name: str, value: float | None, limit: float | None, enough: bool) -> dict[str, Any] | None:
    if limit is None:
        return None
    if value is None or not enough:
        return {"gate": name, "result": INCONCLUSIVE, "value": value, "limit": limit}
    return {
        "gate": name,
        "result": PASS if value <= limit else FAIL,
        "value": round(value, 4),
        "limit": limit,
    }


def evaluate(
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
) -> GateResult:
    """Decide one stage: any failed gate fails it; any inconclusive one makes it wait."""
    deployable = [m for m in members if m.status != "incompatible"]
    active = [m for m in deployable if m.status == "active"]
    failed = [m for m in deployable if m.status == "failed"]
    devices = Device.__table__.c  # type: ignore[attr-defined]  # table columns: see controller.DEVICES
    # Only the exceptions, joined through the rollout's members: reading every member's status
    # (passed as a 10,000-id array at fleet scale) was a third of a tick.
    member = members_.TABLE.c
    stmt = (
        sa.select(devices.id)
        .join_from(members_.TABLE, Device.__table__, devices.id == member.device_id)  # type: ignore[attr-defined]
        .where(member.rollout_id == rollout_id, devices.status != DeviceStatus.online)
    )
    not_online = set(session.execute(stmt).scalars().all())
    offline = [m.device_id for m in deployable if m.device_id in not_online]
    new = collect(session, [m.device_id for m in active], new_version, stage_since, gates.warmup_windows)
    base = collect(session, baseline_device_ids, baseline_version, baseline_since)
    enough_new = new.requests >= gates.min_samples
    checks: list[dict[str, Any]] = []

    fraction = len(active) / len(deployable) if deployable else 1.0
    best_possible = (len(deployable) - len(failed)) / len(deployable) if deployable else 1.0
    activation = PASS if fraction >= gates.min_activated_fraction else INCONCLUSIVE
    if best_possible < gates.min_activated_fraction:
        activation = FAIL
    checks.append(
        {
            "gate": "min_activated_fraction",
            "result": activation,
            "value": round(fraction, 4),
            "limit": gates.min_activated_fraction,
            "failed_devices": [m.device_id for m in failed],
        }
    )
    error_rate = new.errors / new.requests if new.requests else None
    ratio = None
    if new.p95_ms is not None and base.p95_ms and base.requests >= gates.min_samples:
        ratio = new.p95_ms / base.p95_ms
    for check in (
        _limit("max_error_rate", error_rate, gates.max_error_rate, enough_new),
        _limit("max_p95_latency_ms", new.p95_ms, gates.max_p95_latency_ms, enough_new),
        # No baseline version (a first rollout): nothing to compare with, so the ratio gate does not apply.
        _limit(
            "max_p95_latency_ratio",
            ratio,
            gates.max_p95_latency_ratio if baseline_version else None,
            enough_new and ratio is not None,
        ),
        _limit(
            "max_rss_mb",
            new.max_rss_bytes / 2**20 if new.windows else None,
            gates.max_rss_mb,
            new.windows > 0,
        ),
    ):
        if check is not None:
            checks.append(check)
    golden = golden_gate.golden_check(
        session,
        rollout_id=rollout_id,
        min_rate=gates.min_golden_pass_rate,
        active_device_ids=[m.device_id for m in active],
        new_version=new_version,
        baseline_version=baseline_version,
        baseline_device_ids=baseline_device_ids,
    )
    if golden is not None:
        checks.append(golden)
    results = {c["result"] for c in checks}
    result = FAIL if FAIL in results else INCONCLUSIVE if INCONCLUSIVE in results else PASS
    details = {
        "checks": checks,
        "new": {
            "version": new_version,
            "requests": new.requests,
            "errors": new.errors,
            "p95_ms": new.p95_ms,
            "max_rss_mb": round(new.max_rss_bytes / 2**20, 1),
            "devices": len(active),
        },
        "baseline": {
            "version": baseline_version,
            "requests": base.requests,
            "p95_ms": base.p95_ms,
            "devices": len(baseline_device_ids),
        },
        "offline_devices": offline,
    }
    return GateResult(result, details)
