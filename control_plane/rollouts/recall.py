"""Recalling a version: the control plane rolls every device off it, by itself, to the newest good one.

Active rollouts of the recalled version are rolled back first (their devices return to what they
ran before); then every device that still runs or is meant to run it joins one rollout of the
newest version of the model that may still be deployed. That rollout has one stage and no
telemetry gates (the recalled version is no baseline to compare with) and nobody else joins it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import (
    ACTIVE_STATES,
    DEPLOYABLE_STATUSES,
    Artifact,
    Device,
    Model,
    ModelVersion,
    Rollout,
    VersionStatus,
)
from control_plane.rollouts import members as members_
from control_plane.rollouts.controller import ENROLLED, RolloutController
from control_plane.rollouts.create import create_rollout
from control_plane.rollouts.plan import RolloutCreate
from control_plane.services.retention import on_version

RECALL_GATES: dict[str, Any] = {
    "max_p95_latency_ratio": None,
    "max_error_rate": None,
    "min_activated_fraction": 0.0,
    "min_samples": 1,
    "warmup_windows": 0,
}


@dataclass
class RecallResult:
    to_version: str
    rollout: Rollout | None = None
    devices: int = 0
    rolled_back: list[str] = field(default_factory=list)  # active rollouts of the recalled version
    left_to: dict[str, str] = field(default_factory=dict)  # device id -> other active rollout that covers it
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # desired states for the publisher


def newest_good_version(session: Session, model: Model, recalled: ModelVersion) -> ModelVersion:
    has_artifact = sa.exists().where(col(Artifact.version_id) == col(ModelVersion.id))
    row = session.exec(
        select(ModelVersion)
        .where(
            ModelVersion.model_id == model.id,
            ModelVersion.id != recalled.id,
            col(ModelVersion.status).in_(DEPLOYABLE_STATUSES),
            has_artifact,
        )
        .order_by(col(ModelVersion.created_at).desc(), col(ModelVersion.id).desc())
    ).first()
    if row is None:
        raise DomainError(
            ErrorCode.NO_GOOD_VERSION,
            f"{model.name} has no other registered or validated version to move devices to; upload one first",
        )
    return row


def _devices_on(session: Session, model: Model, version: str) -> set[str]:
    """Enrolled devices that run `version` of the model or are meant to."""
    devices = Device.__table__  # type: ignore[attr-defined]
    stmt = sa.select(devices.c.id).where(devices.c.status.in_(ENROLLED), on_version(model.name, version))
    return set(session.execute(stmt).scalars())


def _covered_elsewhere(session: Session, model: Model, device_ids: set[str]) -> dict[str, str]:
    member = members_.TABLE.c
    active = sa.select(col(Rollout.id)).where(col(Rollout.model_id) == model.id, col(Rollout.state).in_(ACTIVE_STATES))
    stmt = sa.select(member.device_id, member.rollout_id).where(member.rollout_id.in_(active))
    return {d: r for d, r in session.execute(stmt).all() if d in device_ids}


def recall(session: Session, *, model: Model, version: ModelVersion, actor: str) -> RecallResult:
    """Mark the version recalled and start the rollout that moves every device off it."""
    good = newest_good_version(session, model, version)
    controller = RolloutController()
    result = RecallResult(to_version=good.version)
    for rollout in session.exec(
        select(Rollout).where(Rollout.version_id == version.id, col(Rollout.state).in_(ACTIVE_STATES))
    ).all():
        controller.rollback(session, rollout, f"{model.name}@{version.version} recalled by {actor}")
        result.rolled_back.append(rollout.id)
    version.status = VersionStatus.recalled
    session.add(version)
    session.flush()
    targets = _devices_on(session, model, version.version)
    result.left_to = _covered_elsewhere(session, model, targets)
    targets -= set(result.left_to)
    if not targets:
        return result
    spec = RolloutCreate(
        model=model.name,
        version=good.version,
        stages=[{"name": "recall", "percent": 100, "min_bake_s": 0}],  # type: ignore[list-item]
        gates=RECALL_GATES,  # type: ignore[arg-type]
        min_quality_retention=None,
        force=True,
    )
    rollout, counts, result.states = create_rollout(
        session, spec=spec, created_by=f"recall:{actor}", only=targets, recall_of=version.version
    )
    rollout.reason = f"recall of {model.name}@{version.version}: every device moves to {good.version}"
    session.add(rollout)
    result.rollout, result.devices = rollout, sum(counts.values())
    return result


def change_status(
    session: Session, *, model: Model, version: ModelVersion, status: str, actor: str
) -> RecallResult | None:
    """Set a version's status; `recalled` also starts the recall (its result is returned)."""
    if version.status in (VersionStatus.recalled, VersionStatus.deleted):
        raise DomainError(
            ErrorCode.INVALID_STATE,
            f"{model.name}@{version.version} is {version.status}; its status is final",
            version_status=version.status,
        )
    if status == VersionStatus.recalled:
        return recall(session, model=model, version=version, actor=actor)
    version.status = status
    session.add(version)
    return None
