"""Read models for the dashboard pages: fleet summary, rollouts with their evaluations, registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from control_plane.api.routes.rollouts import RolloutPublic, rollout_public
from control_plane.models import (
    ACTIVE_STATES,
    DesiredStateRow,
    Device,
    DeviceStatus,
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
    RolloutDevice,
)
from control_plane.schemas import VersionPublic
from control_plane.services.registry import version_public

FAILED_PHASES = ("activation_failed", "download_failed")
LIST_CAP = 100  # rows shown per list; counts above it are still exact


@dataclass
class Drift:
    device: Device
    desired_version: str
    why: str


@dataclass
class FleetSummary:
    total: int
    by_status: dict[str, int]
    by_version: list[tuple[str, int]]
    offline: list[Device]
    offline_count: int
    drift: list[Drift]
    drift_count: int
    incompatible: int
    active_rollouts: list[RolloutPublic] = field(default_factory=list)


def fleet_summary(session: Session) -> FleetSummary:
    by_status = dict(session.exec(select(Device.status, func.count()).group_by(Device.status)).all())
    counted = [s for s in DeviceStatus if s != DeviceStatus.decommissioned]
    version_rows = session.exec(
        select(Device.current_model, Device.current_version, func.count())
        .where(Device.status != DeviceStatus.decommissioned)
        .group_by(Device.current_model, Device.current_version)
    ).all()
    by_version = sorted(
        ((f"{m}@{v}" if v else "no model", n) for m, v, n in version_rows), key=lambda item: (-item[1], item[0])
    )
    offline_stmt = select(Device).where(Device.status == DeviceStatus.offline)
    drift_rows, drift_count = _drift(session)
    active = session.exec(
        select(Rollout).where(col(Rollout.state).in_(ACTIVE_STATES)).order_by(col(Rollout.created_at).desc())
    ).all()
    incompatible = session.exec(
        select(func.count())
        .select_from(RolloutDevice)
        .where(RolloutDevice.status == "incompatible", col(RolloutDevice.rollout_id).in_([r.id for r in active]))
    ).one()
    return FleetSummary(
        total=sum(by_status.get(s, 0) for s in counted),
        by_status={s.value: by_status.get(s, 0) for s in counted},
        by_version=by_version,
        offline=list(session.exec(offline_stmt.order_by(col(Device.last_seen).desc()).limit(LIST_CAP)).all()),
        offline_count=by_status.get(DeviceStatus.offline, 0),
        drift=drift_rows,
        drift_count=drift_count,
        incompatible=int(incompatible),
        active_rollouts=[rollout_public(session, r) for r in active],
    )


def _drift(session: Session) -> tuple[list[Drift], int]:
    """Devices not running the artifact of their desired state, with the likeliest reason."""
    differs = sa.or_(
        col(Device.current_sha256).is_(None), col(Device.current_sha256) != col(DesiredStateRow.artifact_sha256)
    )
    stmt = (
        select(Device, DesiredStateRow)
        .join(DesiredStateRow, col(DesiredStateRow.device_id) == col(Device.id))
        .where(differs, Device.status != DeviceStatus.decommissioned)
    )
    count = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = session.exec(stmt.order_by(Device.name).limit(LIST_CAP)).all()
    return [Drift(device, desired.version, _why(device, desired)) for device, desired in rows], int(count)


def _why(device: Device, desired: DesiredStateRow) -> str:
    if device.status != DeviceStatus.online:
        return f"device is {device.status}"
    if device.phase in FAILED_PHASES:
        return f"{device.phase}: {device.phase_reason or 'no reason given'}"
    if desired.published_message_id != desired.message_id:
        return "desired state not yet published"
    if device.acked_message_id != desired.message_id:
        return "waiting for the device to pick it up"
    return device.phase or "applying"


@dataclass
class RolloutView:
    rollout: RolloutPublic
    device_names: dict[str, str]
    evaluations: list[GateEvaluation]
    evaluation_count: int


def rollout_view(session: Session, rollout: Rollout, history: int = 10) -> RolloutView:
    public = rollout_public(session, rollout, detail=True)
    ids = [d["device_id"] for d in (public.device_details or [])][:LIST_CAP]
    names = dict(session.exec(select(Device.id, Device.name).where(col(Device.id).in_(ids))).all()) if ids else {}
    evaluations = session.exec(
        select(GateEvaluation)
        .where(GateEvaluation.rollout_id == rollout.id)
        .order_by(col(GateEvaluation.created_at).desc())
        .limit(history)
    ).all()
    count = session.exec(
        select(func.count()).select_from(GateEvaluation).where(GateEvaluation.rollout_id == rollout.id)
    ).one()
    return RolloutView(public, names, list(evaluations), int(count))


def recent_rollouts(session: Session, limit: int = 50) -> list[RolloutPublic]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit)).all()
    return [rollout_public(session, r) for r in rows]


@dataclass
class ModelView:
    model: Model
    versions: list[VersionPublic]
    devices_on: dict[str, int]  # version -> devices currently serving it


def registry_view(session: Session) -> list[ModelView]:
    views = []
    for model in session.exec(select(Model).order_by(Model.name)).all():
        rows = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(col(ModelVersion.created_at).desc())
        ).all()
        serving = session.exec(
            select(Device.current_version, func.count())
            .where(Device.current_model == model.name)
            .group_by(Device.current_version)
        ).all()
        views.append(ModelView(model, [version_public(session, model, r) for r in rows], dict(serving)))
    return views


def known_versions(session: Session) -> list[str]:
    rows = session.exec(select(Device.current_version).where(col(Device.current_version).is_not(None)).distinct())
    return sorted(v for v in rows.all() if v)


def metric_rows(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate checks in a stable order for display (activation first, then the plan's order)."""
    return sorted(checks, key=lambda c: (c.get("gate") != "min_activated_fraction",))
