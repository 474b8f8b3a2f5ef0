"""The fleet at a glance: devices by status and by model version, and who is not where it should be."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from control_plane.models import (
    DesiredStateRow,
    Device,
    DeviceStatus,
    GateEvaluation,
    Rollout,
    RolloutDevice,
    as_utc,
)


def _by_status(session: Session) -> dict[str, int]:
    rows = session.exec(select(Device.status, func.count()).group_by(Device.status)).all()
    return dict(rows)


def _by_version(session: Session) -> list[dict[str, Any]]:
    online = func.sum(sa.case((col(Device.status) == DeviceStatus.online, 1), else_=0))
    rows = session.exec(
        select(Device.current_model, Device.current_version, func.count(), online)
        .where(Device.status != DeviceStatus.decommissioned)
        .group_by(col(Device.current_model), col(Device.current_version))
        .order_by(col(Device.current_model), col(Device.current_version))
    ).all()
    return [{"model": m, "version": v, "devices": n, "online": int(o or 0)} for m, v, n, o in rows]


def _offline(session: Session, limit: int) -> list[dict[str, Any]]:
    rows = session.exec(
        select(Device).where(Device.status == DeviceStatus.offline).order_by(Device.name).limit(limit)
    ).all()
    return [{"device_id": d.id, "name": d.name, "last_seen": as_utc(d.last_seen)} for d in rows]


def _incompatible(session: Session, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Devices whose most recent rollout found no artifact that fits their hardware."""
    flagged = select(RolloutDevice.device_id).where(RolloutDevice.status == "incompatible")
    rows = session.exec(
        select(RolloutDevice, Rollout.created_at, Rollout.state, Device.name)
        .join(Rollout, col(Rollout.id) == RolloutDevice.rollout_id)
        .join(Device, col(Device.id) == RolloutDevice.device_id)
        .where(col(RolloutDevice.device_id).in_(flagged))
        .order_by(col(Rollout.created_at))
    ).all()
    latest = {member.device_id: (member, state, name) for member, _, state, name in rows}
    found = [
        {
            "device_id": member.device_id,
            "name": name,
            "rollout_id": member.rollout_id,
            "rollout_state": state,
            "reason": member.reason,
        }
        for member, state, name in latest.values()
        if member.status == "incompatible"
    ]
    return len(found), sorted(found, key=lambda d: d["name"])[:limit]


def _why_not_desired(device: Device, desired: DesiredStateRow) -> str:
    if device.status != DeviceStatus.online:
        return f"device is {device.status}"
    if desired.published_message_id != desired.message_id:
        return "desired state not yet published"
    if device.acked_message_id != desired.message_id:
        return "desired state not yet acknowledged by the device"
    phase = device.phase or "unknown"
    return f"{phase}: {device.phase_reason}" if device.phase_reason else phase


def _not_on_desired(session: Session, limit: int) -> tuple[int, list[dict[str, Any]]]:
    # Each part is true or false, never NULL (NOT NULL would drop the row from either side).
    serving_desired = sa.and_(
        col(DesiredStateRow.unload).is_(False),
        col(Device.current_sha256).is_not(None),
        col(Device.current_sha256) == DesiredStateRow.artifact_sha256,
    )
    # A withdrawn model (unload) is done once the device serves nothing and acknowledged it.
    serving_nothing = sa.and_(
        col(DesiredStateRow.unload).is_(True),
        col(Device.current_sha256).is_(None),
        col(Device.acked_message_id).is_not(None),
        col(Device.acked_message_id) == DesiredStateRow.message_id,
    )
    mismatch = sa.and_(
        col(Device.status) != DeviceStatus.decommissioned, sa.not_(sa.or_(serving_desired, serving_nothing))
    )
    on_desired = col(DesiredStateRow.device_id) == Device.id
    joined = select(Device, DesiredStateRow).join(DesiredStateRow, on_desired)
    counted = select(func.count()).select_from(Device).join(DesiredStateRow, on_desired)
    total = session.exec(counted.where(mismatch)).one()
    rows = session.exec(joined.where(mismatch).order_by(Device.name).limit(limit)).all()
    listed = [
        {
            "device_id": device.id,
            "name": device.name,
            "status": device.status,
            "current_version": device.current_version,
            "desired_version": None if desired.unload else desired.version,
            "rollout_id": desired.rollout_id,
            "phase": device.phase,
            "reason": _why_not_desired(device, desired),
        }
        for device, desired in rows
    ]
    return int(total), listed


def fleet_summary(session: Session, *, limit: int = 100) -> dict[str, Any]:
    """Counts are complete; the device lists hold at most `limit` entries each."""
    by_status = _by_status(session)
    incompatible_count, incompatible = _incompatible(session, limit)
    drift_count, drift = _not_on_desired(session, limit)
    rollouts = session.exec(select(Rollout.state, func.count()).group_by(Rollout.state)).all()
    return {
        "devices": sum(n for s, n in by_status.items() if s != DeviceStatus.decommissioned),
        "by_status": by_status,
        "by_version": _by_version(session),
        "online": by_status.get(DeviceStatus.online, 0),
        "offline": {"count": by_status.get(DeviceStatus.offline, 0), "devices": _offline(session, limit)},
        "incompatible": {"count": incompatible_count, "devices": incompatible},
        "not_on_desired": {"count": drift_count, "devices": drift},
        "rollouts_by_state": dict(rollouts),
    }


def rollout_progress(session: Session, rollout: Rollout, evaluations: list[GateEvaluation]) -> dict[str, Any]:
    """Devices per state now, and one point per gate evaluation (the values charts plot)."""
    members = session.exec(
        select(RolloutDevice.status, func.count())
        .where(RolloutDevice.rollout_id == rollout.id)
        .group_by(RolloutDevice.status)
    ).all()
    points = []
    for evaluation in evaluations:
        details = evaluation.details or {}
        new = details.get("new", {})
        baseline = details.get("baseline", {})
        points.append(
            {
                "t": as_utc(evaluation.created_at),
                "stage_index": evaluation.stage_index,
                "result": evaluation.result,
                "gates": {
                    c["gate"]: {"value": c.get("value"), "limit": c.get("limit"), "result": c["result"]}
                    for c in details.get("checks", [])
                },
                "active_devices": new.get("devices"),
                "requests": new.get("requests"),
                "error_rate": (new["errors"] / new["requests"]) if new.get("requests") else None,
                "p95_ms": new.get("p95_ms"),
                "baseline_p95_ms": baseline.get("p95_ms"),
                "max_rss_mb": new.get("max_rss_mb"),
            }
        )
    return {
        "rollout_id": rollout.id,
        "state": rollout.state,
        "stage_index": rollout.stage_index,
        "devices": dict(members),
        "points": points,
    }
