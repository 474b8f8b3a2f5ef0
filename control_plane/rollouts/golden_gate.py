"""The golden-prompt gate: the pass rate devices measured on their own runtime during the trial.

Each agent answers the version's golden set once it serves it and reports the outcome with its
activation result (the `activation_succeeded` event's `detail.golden`). Per hardware class (the
CPU model, architecture and accelerators: what changes a quantized model's numerics), the stage's
pass rate must reach `min_golden_pass_rate` times the rate the baseline version reached on the
same class; with no baseline report on a class the floor is absolute.

No single device decides it, as with the telemetry checks (`robust`): a device's report counts
only within the outcome's bounds, each device once with its weight capped at the median device's;
the check waits for `min_reporting_share` of the stage's active devices, and fails or passes only
if it would with any one reporting device left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlmodel import Session

from control_plane.db import bulk
from control_plane.models import Device, DeviceEvent, ModelVersion, Rollout, as_utc
from control_plane.rollouts import robust
from control_plane.rollouts.gate_checks import ClassRate, GoldenCheck, Outcome
from shared.state import GoldenOutcome

# Baseline devices read per evaluation: the rate of a class needs a sample, not the whole fleet.
BASELINE_SAMPLE = 200
GoldenClass = tuple[Any, ...]


def golden_class(hardware: dict[str, Any]) -> GoldenClass:
    return (hardware.get("arch"), hardware.get("cpu_model"), tuple(sorted(hardware.get("accelerators") or ())))


def _outcome(golden: Any) -> GoldenOutcome | None:
    """A stored report as an outcome within bounds (rows stored before the ingest checked them may not be)."""
    try:
        outcome = GoldenOutcome.model_validate(golden)
    except ValidationError:
        return None
    return outcome if outcome.total else None


def _reports(
    session: Session, device_ids: list[str], version: str | None, since: datetime | None
) -> dict[str, GoldenOutcome]:
    """Device id -> its latest golden outcome for `version` (from activation events)."""
    if not device_ids or version is None:
        return {}
    events = DeviceEvent.__table__.c  # type: ignore[attr-defined]
    latest: dict[str, GoldenOutcome] = {}
    for clause in bulk.matching(session, events.device_id, device_ids):
        stmt = sa.select(events.device_id, events.detail).where(clause, events.kind == "activation_succeeded")
        if since is not None:
            stmt = stmt.where(events.created_at >= since)
        for device_id, detail in session.execute(stmt.order_by(events.created_at)).all():
            outcome = _outcome(((detail or {}).get("detail") or {}).get("golden"))
            if detail.get("version") == version and outcome is not None:
                latest[device_id] = outcome
    return latest


def _classes(session: Session, device_ids: list[str]) -> dict[str, GoldenClass]:
    devices = Device.__table__.c  # type: ignore[attr-defined]
    found: dict[str, GoldenClass] = {}
    for clause in bulk.matching(session, devices.id, device_ids):
        for device_id, hardware in session.execute(sa.select(devices.id, devices.hardware).where(clause)).all():
            found[device_id] = golden_class(hardware or {})
    return found


Pooled = dict[GoldenClass, tuple[float, dict[str, float | None]]]


def _pooled(reports: dict[str, GoldenOutcome], classes: dict[str, GoldenClass]) -> Pooled:
    """Per class, the pass rate over its devices (each weighing at most the median device's) and,
    per device, the rate with it left out (None: it is the class's only device)."""
    members: dict[GoldenClass, list[GoldenOutcome]] = {}
    ids: dict[GoldenClass, list[str]] = {}
    for device_id, outcome in reports.items():
        key = classes.get(device_id, ())
        members.setdefault(key, []).append(outcome)
        ids.setdefault(key, []).append(device_id)
    pooled: Pooled = {}
    for key, outcomes in members.items():
        samples = [robust.DeviceSample(requests=o.total, errors=o.total - o.passed) for o in outcomes]
        weighted = [(o.passed * w, o.total * w) for o, w in zip(outcomes, robust.scales(samples), strict=True)]
        passed, total = sum(p for p, _ in weighted), sum(t for _, t in weighted)
        alone = len(outcomes) == 1
        left_out = {
            d: None if alone else (passed - p) / (total - t) for d, (p, t) in zip(ids[key], weighted, strict=True)
        }
        pooled[key] = (passed / total, left_out)
    return pooled


def _limits(base: Pooled, classes: list[GoldenClass], min_rate: float) -> dict[GoldenClass, float]:
    return {key: round(min_rate * (base[key][0] if key in base else 1.0), 4) for key in classes}


def _verdict(new: Pooled, limits: dict[GoldenClass, float]) -> str:
    """The verdict ("fail", "pass") where it holds with any one reporting device left out, else "inconclusive"."""
    failing = {key for key, (rate, _) in new.items() if rate < limits[key]}
    outcomes = {"fail" if failing else "pass" if new else "none"}
    if sum(len(left_out) for _, left_out in new.values()) > 1:
        for key, (_, left_out) in new.items():  # leaving a device out changes only its own class's rate
            for rate in left_out.values():
                still = len(failing - {key}) + (rate is not None and rate < limits[key])
                remaining = len(new) - (rate is None)
                outcomes.add("fail" if still else "pass" if remaining else "none")
    return outcomes.pop() if len(outcomes) == 1 and "none" not in outcomes else "inconclusive"


def _started_with_golden_set(session: Session, rollout_id: str) -> datetime | None:
    """When the rollout began, if its version carries a golden set (None: no check applies)."""
    rollout = session.get(Rollout, rollout_id)
    version = session.get(ModelVersion, rollout.version_id) if rollout else None
    return as_utc(rollout.created_at) if rollout and version and version.golden_set else None


@dataclass(frozen=True)
class GoldenSample:
    """The golden reports a stage's check is decided on (`collect`), by device id."""

    active_device_ids: tuple[str, ...]
    new: dict[str, GoldenOutcome]
    baseline: dict[str, GoldenOutcome]
    classes: dict[str, GoldenClass]


def collect(
    session: Session,
    *,
    rollout_id: str,
    active_device_ids: list[str],
    new_version: str,
    baseline_version: str | None,
    baseline_device_ids: list[str],
) -> GoldenSample | None:
    """The reports the check needs (None: the version carries no golden set). A device reports
    once, when it activates: reports since the rollout began count in every later stage."""
    started = _started_with_golden_set(session, rollout_id)
    if started is None:
        return None
    new = _reports(session, active_device_ids, new_version, started)
    sample = list(dict.fromkeys(active_device_ids + baseline_device_ids[:BASELINE_SAMPLE]))
    base = _reports(session, sample, baseline_version, None)
    classes = _classes(session, list(new) + list(base))
    return GoldenSample(tuple(active_device_ids), new, base, classes)


def decide(sample: GoldenSample, min_rate: float, min_reporting_share: float = 1.0) -> GoldenCheck:
    """The check over collected reports, reading no database."""
    new = sample.new
    new_pooled, base_pooled = _pooled(new, sample.classes), _pooled(sample.baseline, sample.classes)
    limits = _limits(base_pooled, list(new_pooled), min_rate)
    per_class = tuple(
        ClassRate(
            hardware_class=key,
            value=round(rate, 4),
            baseline=None if key not in base_pooled else round(base_pooled[key][0], 4),
            limit=limits[key],
        )
        for key, (rate, _) in new_pooled.items()
    )
    active = sample.active_device_ids
    required = max(1, math.ceil(min_reporting_share * len(active)))
    quorum = len(new) >= required
    outcome = Outcome(_verdict(new_pooled, limits)) if quorum else Outcome.HELD
    why = {Outcome.FAILED: "a class is below its floor with any one device left out",
           Outcome.PASSED: "every class reaches its floor with any one device left out"}.get(outcome)  # fmt: skip
    return GoldenCheck(
        name="min_golden_pass_rate",
        outcome=outcome,
        value=min((c.value for c in per_class), default=None),
        limit=min_rate,
        reason=why or ("waiting for devices' golden reports" if not quorum else "one device alone decides"),
        classes=per_class,
        reporting_devices=len(new),
        required_reporting_devices=required,
        waiting_for=tuple([d for d in active if d not in new][:20]) if outcome is Outcome.HELD else None,
        failed_prompts=tuple(sorted({p for g in new.values() for p in g.failed})[:32]),
    )
