"""Starting a rollout: checks, its members, and its first stage assigned in the same transaction.

The first stage's desired states are written with the rollout, so the publisher can send them
the moment the request commits: no controller tick between "promote" and the devices hearing of
it, and each member row is written once (inserted assigned) instead of inserted then updated.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import ACTIVE_STATES, DEPLOYABLE_STATUSES, DesiredStateRow, ModelVersion, Rollout, utcnow
from control_plane.rollouts import assign, schedule
from control_plane.rollouts import members as members_
from control_plane.rollouts.controller import (
    DEVICES,
    HardwareProfiles,
    RolloutController,
    enrolled_matching,
    hardware_json,
)
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import RolloutCreate
from control_plane.services import registry
from control_plane.services.eval_metrics import quality_retention


def check_quality_floor(session: Session, spec: RolloutCreate, version: ModelVersion) -> None:
    """Refuse a version measured below the plan's floor; one never measured is not refused."""
    floor = spec.min_quality_retention
    retention = quality_retention(session, version, spec.quality_metric)
    if floor is None or retention is None or retention >= floor:
        return
    raise DomainError(
        ErrorCode.QUALITY_BELOW_FLOOR,
        f"{spec.model}@{spec.version} keeps {retention:.1%} of its parent's quality ({spec.quality_metric}), "
        f"below the floor of {floor:.1%}; set force to roll it out anyway",
        quality_retention=retention,
        quality_metric=spec.quality_metric,
        min_quality_retention=floor,
        evaluated_against=(version.eval_metrics or {}).get("evaluated_against"),
    )


def create_rollout(
    session: Session,
    *,
    spec: RolloutCreate,
    created_by: str,
    controller: RolloutController | None = None,
    only: set[str] | None = None,
    recall_of: str | None = None,
) -> tuple[Rollout, dict[str, int], dict[str, dict[str, Any]]]:
    """A running rollout whose first stage is assigned (desired states written, not yet published),
    how many of its members are in each status, and the desired states written (device id ->
    DesiredState as JSON), for the publisher once this commits. `only`: of the devices the
    selector matches, just these; `recall_of`: the recalled version this rollout moves them off."""
    controller = controller or RolloutController()
    model, version = registry.get_version(session, spec.model, spec.version)
    if version.status not in DEPLOYABLE_STATUSES:
        raise DomainError(
            ErrorCode.INVALID_STATE, f"{spec.model}@{spec.version} is {version.status}", version_status=version.status
        )
    if not spec.force:
        check_quality_floor(session, spec, version)
    hardware, versions_now = _targets(session, spec.selector, model.name, only)
    if not hardware:
        raise DomainError(ErrorCode.VALIDATION_ERROR, "no enrolled device matches the selector", selector=spec.selector)
    _refuse_overlap(session, model.id, set(hardware))
    device_ids = list(hardware)
    baseline = [(recall_of, 1)] if recall_of else versions_now.most_common(1)
    plan = spec.model_dump(mode="json") | {"baseline_version": baseline[0][0] if baseline else None}
    if recall_of:
        plan["recall_of"] = recall_of
    now = utcnow()
    rollout = Rollout(
        model_id=model.id,
        version_id=version.id,
        selector=spec.selector,
        plan=plan,
        created_by=created_by,
        stage_started_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    keys = {d: hashlib.sha256(f"{rollout.id}:{d}".encode()).hexdigest() for d in device_ids}
    members = [Member(d, -1, "waiting", None) for d in sorted(device_ids, key=keys.__getitem__)]
    first = members[: spec.stages[0].cumulative_size(len(members))]
    admitted, held = schedule.admit(session, spec, first, now=now, stage_started=now, given=0)
    deployable = assign.deployable_artifacts(session, version)
    states, changes = controller.assignments(rollout, admitted, model, version, deployable, hardware)
    for member in held:
        member.status = schedule.WAITING_WINDOW
        changes.append({"device_id": member.device_id, "status": schedule.WAITING_WINDOW})
    _insert_members(session, rollout.id, members, keys, changes, set(states))
    assign.write_desired(session, states)
    return rollout, dict(Counter(m.status for m in members)), states


def _insert_members(
    session: Session,
    rollout_id: str,
    members: list[Member],
    keys: dict[str, str],
    changes: list[dict[str, Any]],
    assigned: set[str],
) -> None:
    """Every member in one set-based insert per kind: a SQLModel object per member cost more than
    the rest of the request. The first stage's rows carry each device's desired state from before
    the rollout (for a rollback), copied by the database in the same statement; the others get
    theirs when they are assigned."""
    by_device = {change["device_id"]: change for change in changes}
    rows: list[dict[str, Any]] = [
        {
            "rollout_id": rollout_id,
            "device_id": m.device_id,
            "order_key": keys[m.device_id],
            "stage_index": -1,
            "status": "waiting",
            "reason": "",
            "artifact_sha256": None,
            "assigned_at": None,
        }
        | by_device.get(m.device_id, {})
        for m in members
    ]
    members_.insert(session, [row for row in rows if row["device_id"] in assigned], keep_previous_desired=True)
    members_.insert(session, [row for row in rows if row["device_id"] not in assigned])


def _targets(
    session: Session, selector: str, model_name: str, only: set[str] | None = None
) -> tuple[HardwareProfiles, Counter[str]]:
    """device id -> hardware profile of the enrolled devices the selector matches, and how many of
    them are meant to run each version of the model now (the baseline), in one query."""
    desired = DesiredStateRow.__table__  # type: ignore[attr-defined]
    # A withdrawn version (unload) is not what the device is meant to run: it is no baseline.
    on = sa.and_(desired.c.device_id == DEVICES.c.id, desired.c.model == model_name, desired.c.unload.is_(False))
    stmt = enrolled_matching(selector, DEVICES.c.id, hardware_json(), desired.c.version).outerjoin_from(
        DEVICES, desired, on
    )
    hardware = HardwareProfiles()
    versions: Counter[str] = Counter()
    for device_id, text, version in session.execute(stmt).all():
        if only is not None and device_id not in only:
            continue
        hardware.add(device_id, text)
        if version is not None:
            versions[version] += 1
    return hardware, versions


def _refuse_overlap(session: Session, model_id: str, device_ids: set[str]) -> None:
    """Only one active rollout per model may cover a device (409 `rollout_conflict`)."""
    member = members_.TABLE.c
    for other in session.exec(
        select(Rollout).where(Rollout.model_id == model_id, col(Rollout.state).in_(ACTIVE_STATES))
    ):
        others = session.execute(sa.select(member.device_id).where(member.rollout_id == other.id)).scalars().all()
        if device_ids & set(others):
            raise DomainError(
                ErrorCode.ROLLOUT_CONFLICT,
                "an active rollout of this model covers some of these devices",
                rollout_id=other.id,
            )
