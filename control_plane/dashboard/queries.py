"""Read models for the dashboard pages: fleet summary, rollouts with their evaluations, registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, func, select

from control_plane.api.routes.rollouts import RolloutPublic, rollout_public
from control_plane.models import (
    ACTIVE_STATES,
    Device,
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
)
from control_plane.schemas import VersionPublic
from control_plane.services.events import latest_events
from control_plane.services.registry import version_public
from control_plane.telemetry.summary import fleet_summary

LIST_CAP = 100  # rows shown per list; counts above it are still exact
EVENTS_SHOWN = 20


def fleet_overview(session: Session) -> dict[str, Any]:
    """The REST fleet summary (`/v1/telemetry/summary`, so both agree) plus the active rollouts."""
    summary = fleet_summary(session, limit=LIST_CAP)
    by_version = [
        (f"{row['model']}@{row['version']}" if row["version"] else "no model", row["devices"])
        for row in summary["by_version"]
    ]
    active = session.exec(
        select(Rollout).where(col(Rollout.state).in_(ACTIVE_STATES)).order_by(col(Rollout.created_at).desc())
    ).all()
    return summary | {
        # Largest group first; NULLs sort differently on SQLite and PostgreSQL, so order here.
        "by_version_labels": sorted(by_version, key=lambda item: (-item[1], item[0])),
        "active_rollouts": [rollout_public(session, r) for r in active],
    }


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
        views.append(
            ModelView(model, [version_public(session, model, r) for r in rows], {v: n for v, n in serving if v})
        )
    return views


@dataclass
class EventRow:
    device_name: str
    kind: str
    subject: str  # model@version the event is about, if any
    message: str
    created_at: Any


def recent_events(session: Session, devices: list[Device]) -> list[EventRow]:
    """The newest events of the devices shown, newest first."""
    names = {d.id: d.name for d in devices}
    rows = []
    for event in latest_events(session, list(names), EVENTS_SHOWN):
        detail = event.detail or {}
        model, version = detail.get("model"), detail.get("version")
        subject = f"{model}@{version}" if model and version else str(model or version or "")
        message = str(detail.get("message") or "")
        rows.append(EventRow(names[event.device_id], event.kind, subject, message, event.created_at))
    return rows


def known_versions(session: Session) -> list[str]:
    rows = session.exec(select(Device.current_version).where(col(Device.current_version).is_not(None)).distinct())
    return sorted(v for v in rows.all() if v)


def metric_rows(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate checks in a stable order for display (activation first, then the plan's order)."""
    return sorted(checks, key=lambda c: (c.get("gate") != "min_activated_fraction",))


def check_value(details: dict[str, Any], gate: str) -> float | None:
    """The value one gate had in an evaluation, or None when it was not checked or had no value."""
    for check in details.get("checks", []):
        if check.get("gate") == gate:
            value = check.get("value")
            return float(value) if isinstance(value, int | float) else None
    return None
