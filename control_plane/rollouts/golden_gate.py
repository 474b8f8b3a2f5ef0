"""The golden-prompt gate: the pass rate devices measured on their own runtime during the trial.

Each agent answers the version's golden set once it serves it and reports the outcome with its
activation result (the `activation_succeeded` event's `detail.golden`). Per hardware class (the
CPU model, architecture and accelerators: what changes a quantized model's numerics), the stage's
pass rate must reach `min_golden_pass_rate` times the rate the baseline version reached on the
same class; with no baseline report on a class the floor is absolute.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from control_plane import bulk
from control_plane.models import Device, DeviceEvent, ModelVersion, Rollout, as_utc

# Baseline devices read per evaluation: the rate of a class needs a sample, not the whole fleet.
BASELINE_SAMPLE = 200
GoldenClass = tuple[Any, ...]


def golden_class(hardware: dict[str, Any]) -> GoldenClass:
    return (hardware.get("arch"), hardware.get("cpu_model"), tuple(sorted(hardware.get("accelerators") or ())))


def _reports(
    session: Session, device_ids: list[str], version: str | None, since: datetime | None
) -> dict[str, dict[str, Any]]:
    """Device id -> its latest golden outcome for `version` (from activation events)."""
    if not device_ids or version is None:
        return {}
    events = DeviceEvent.__table__.c  # type: ignore[attr-defined]
    latest: dict[str, dict[str, Any]] = {}
    for clause in bulk.matching(session, events.device_id, device_ids):
        stmt = sa.select(events.device_id, events.detail).where(clause, events.kind == "activation_succeeded")
        if since is not None:
            stmt = stmt.where(events.created_at >= since)
        for device_id, detail in session.execute(stmt.order_by(events.created_at)).all():
            golden = ((detail or {}).get("detail") or {}).get("golden")
            if detail.get("version") == version and isinstance(golden, dict) and golden.get("total"):
                latest[device_id] = golden
    return latest


def _classes(session: Session, device_ids: list[str]) -> dict[str, GoldenClass]:
    devices = Device.__table__.c  # type: ignore[attr-defined]
    found: dict[str, GoldenClass] = {}
    for clause in bulk.matching(session, devices.id, device_ids):
        for device_id, hardware in session.execute(sa.select(devices.id, devices.hardware).where(clause)).all():
            found[device_id] = golden_class(hardware or {})
    return found


def _rates(reports: dict[str, dict[str, Any]], classes: dict[str, GoldenClass]) -> dict[GoldenClass, float]:
    passed: dict[GoldenClass, int] = {}
    total: dict[GoldenClass, int] = {}
    for device_id, golden in reports.items():
        key = classes.get(device_id, ())
        passed[key] = passed.get(key, 0) + int(golden.get("passed") or 0)
        total[key] = total.get(key, 0) + int(golden["total"])
    return {key: passed[key] / total[key] for key in total}


def _started_with_golden_set(session: Session, rollout_id: str) -> datetime | None:
    """When the rollout began, if its version carries a golden set (None: no check applies)."""
    rollout = session.get(Rollout, rollout_id)
    version = session.get(ModelVersion, rollout.version_id) if rollout else None
    return as_utc(rollout.created_at) if rollout and version and version.golden_set else None


def golden_check(
    session: Session,
    *,
    rollout_id: str,
    min_rate: float | None,
    active_device_ids: list[str],
    new_version: str,
    baseline_version: str | None,
    baseline_device_ids: list[str],
) -> dict[str, Any] | None:
    """The gate's check (None: not asked for, or the version carries no golden set). A device
    reports once, when it activates: reports since the rollout began count in every later stage."""
    started = None if min_rate is None else _started_with_golden_set(session, rollout_id)
    if min_rate is None or started is None:
        return None
    new = _reports(session, active_device_ids, new_version, started)
    sample = list(dict.fromkeys(active_device_ids + baseline_device_ids[:BASELINE_SAMPLE]))
    base = _reports(session, sample, baseline_version, None)
    classes = _classes(session, list(new) + list(base))
    new_rates, base_rates = _rates(new, classes), _rates(base, classes)
    per_class: list[dict[str, Any]] = []
    for key, rate in new_rates.items():
        reference = base_rates.get(key)
        limit = round(min_rate * (reference if reference is not None else 1.0), 4)
        per_class.append(
            {
                "class": list(key),
                "value": round(rate, 4),
                "baseline": None if reference is None else round(reference, 4),
                "limit": limit,
            }
        )
    missing = [d for d in active_device_ids if d not in new]
    check: dict[str, Any] = {"gate": "min_golden_pass_rate", "limit": min_rate, "classes": per_class}
    if any(c["value"] < c["limit"] for c in per_class):
        check["result"] = "fail"
    elif missing or not per_class:
        check["result"] = "inconclusive"  # a device on trial has not reported its golden run yet
        check["waiting_for"] = missing[:20]
    else:
        check["result"] = "pass"
    check["value"] = min((c["value"] for c in per_class), default=None)
    check["failed_prompts"] = sorted({p for g in new.values() for p in g.get("failed") or ()})[:32]
    return check
