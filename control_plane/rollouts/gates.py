"""Gate evaluation over the telemetry of a stage's devices, against limits and the baseline.

Percentiles across devices and windows come from merged fixed-bucket histograms (the agents use
the OpenTelemetry gen_ai request-duration buckets), interpolated inside the bucket; a window
without a histogram falls back to its own exact p95, weighted by its request count. No single
device decides a check (`robust`): telemetry checks wait until `min_reporting_share` of the
stage's active devices have reported, each device's weight is capped at the median device's, and
a check fails or passes only if it would with any one device left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane.db import bulk
from control_plane.models import Device, DeviceStatus, TelemetryRecord
from control_plane.rollouts import golden_gate, robust
from control_plane.rollouts import members as members_
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates
from control_plane.rollouts.robust import DeviceSample, Spread
from shared.telemetry import REQUEST_DURATION_BUCKETS

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
LATENCY_BOUNDS = list(REQUEST_DURATION_BUCKETS)


@dataclass
class Sample:
    """A set of devices' telemetry of one version: per device, and the bucket bounds merged on."""

    devices: dict[str, DeviceSample] = field(default_factory=dict)
    bounds: list[float] | None = None

    @property
    def requests(self) -> int:
        return sum(d.requests for d in self.devices.values())

    @property
    def errors(self) -> int:
        return sum(d.errors for d in self.devices.values())

    @property
    def windows(self) -> int:
        return sum(d.windows for d in self.devices.values())

    def reporting(self) -> list[DeviceSample]:
        return robust.reporting(list(self.devices.values()))

    def p95_ms(self) -> Spread:
        return robust.p95_ms(self.reporting(), self.bounds)

    def enough(self, min_samples: int) -> bool:
        return robust.counted_requests(self.reporting()) >= min_samples


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
    return percentile_of(bounds, counts, q)


def percentile_of(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """q-quantile of bucket counts (weights may be fractional), interpolated inside the bucket."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
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


def _limit(name: str, spread: Spread, limit: float | None, enough: bool, scale: float = 1.0) -> dict[str, Any] | None:
    """Fail only if the value exceeds `limit` with any one device left out, pass only if it stays
    within it with any one left out; otherwise (or without enough data) wait."""
    if limit is None:
        return None
    value = None if spread.value is None else spread.value * scale
    if value is None or not enough or spread.low is None or spread.high is None:
        return {"gate": name, "result": INCONCLUSIVE, "value": value, "limit": limit}
    low, high = spread.low * scale, spread.high * scale
    result = FAIL if low > limit else PASS if high <= limit else INCONCLUSIVE
    return {"gate": name, "result": result, "value": round(value, 4), "limit": limit,
            "range": [round(low, 4), round(high, 4)]}  # fmt: skip


def _activation(gates: Gates, deployable: list[Member], active: list[Member], failed: list[Member]) -> dict[str, Any]:
    fraction = len(active) / len(deployable) if deployable else 1.0
    best_possible = (len(deployable) - len(failed)) / len(deployable) if deployable else 1.0
    activation = PASS if fraction >= gates.min_activated_fraction else INCONCLUSIVE
    if best_possible < gates.min_activated_fraction:
        activation = FAIL
    return {
        "gate": "min_activated_fraction",
        "result": activation,
        "value": round(fraction, 4),
        "limit": gates.min_activated_fraction,
        "failed_devices": [m.device_id for m in failed],
    }


def _telemetry_checks(
    gates: Gates, new: Sample, base: Sample, active: int, has_baseline: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The checks on the new version's telemetry, and the reporting figures they rest on."""
    reporters = new.reporting()
    required = max(1, math.ceil(gates.min_reporting_share * active))
    quorum = len(reporters) >= required
    enough_new = quorum and new.enough(gates.min_samples)
    new_p95 = new.p95_ms()
    ratio = robust.ratio(new_p95, base.p95_ms()) if base.enough(gates.min_samples) else robust.NO_DATA
    with_windows = sum(1 for d in new.devices.values() if d.windows)
    checks = [
        _limit("max_error_rate", robust.error_rate(reporters), gates.max_error_rate, enough_new),
        _limit("max_p95_latency_ms", new_p95, gates.max_p95_latency_ms, enough_new),
        # No baseline version (a first rollout): nothing to compare with, so the ratio gate does not apply.
        _limit("max_p95_latency_ratio", ratio, gates.max_p95_latency_ratio if has_baseline else None, enough_new),
        _limit(
            "max_rss_mb",
            robust.max_rss_bytes(list(new.devices.values())),
            gates.max_rss_mb,
            with_windows >= required,
            scale=1 / 2**20,
        ),
    ]
    reporting = {"reporting_devices": len(reporters), "required_reporting_devices": required}
    return [c for c in checks if c is not None], {"p95_ms": new_p95.value, **reporting}


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
    # Only the exceptions, joined through the rollout's members, not every member's status
    # (docs/performance.md#controller-ticks).
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
    telemetry, figures = _telemetry_checks(gates, new, base, len(active), baseline_version is not None)
    checks = [_activation(gates, deployable, active, failed), *telemetry]
    golden = golden_gate.golden_check(
        session,
        rollout_id=rollout_id,
        min_rate=gates.min_golden_pass_rate,
        active_device_ids=[m.device_id for m in active],
        new_version=new_version,
        baseline_version=baseline_version,
        baseline_device_ids=baseline_device_ids,
        min_reporting_share=gates.min_reporting_share,
    )
    if golden is not None:
        checks.append(golden)
    results = {c["result"] for c in checks}
    result = FAIL if FAIL in results else INCONCLUSIVE if INCONCLUSIVE in results else PASS
    max_rss = max((d.max_rss_bytes for d in new.devices.values()), default=0)
    details = {
        "checks": checks,
        "new": {
            "version": new_version,
            "requests": new.requests,
            "errors": new.errors,
            "max_rss_mb": round(max_rss / 2**20, 1),
            "devices": len(active),
            **figures,
        },
        "baseline": {
            "version": baseline_version,
            "requests": base.requests,
            "p95_ms": base.p95_ms().value,
            "devices": len(baseline_device_ids),
        },
        "offline_devices": offline,
    }
    return GateResult(result, details)
