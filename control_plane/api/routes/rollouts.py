"""`/v1/rollouts`: create a staged rollout, watch it, promote, pause, resume, abort."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlmodel import Session, col, func, select

from control_plane.api.deps import MutationDep, OperatorDep, SessionDep, ViewerDep
from control_plane.errors import DomainError, ErrorCode
from control_plane.models import (
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
    RolloutDevice,
)
from control_plane.rollouts import actions
from control_plane.rollouts.create import create_rollout
from control_plane.rollouts.plan import RolloutCreate
from control_plane.schemas import UTCDatetime
from control_plane.services import pagination

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])


class GateEvaluationPublic(BaseModel):
    stage_index: int
    result: str
    details: dict[str, Any]
    created_at: UTCDatetime


class RolloutPublic(BaseModel):
    id: str
    model: str
    version: str
    selector: str
    state: str
    stage_index: int
    stage: str
    stages: list[dict[str, Any]]
    promotion: str
    reason: str
    baseline_version: str | None
    maintenance: dict[str, Any] | None = None
    max_per_minute: int | None = None
    abort: dict[str, Any] | None = None
    recall_of: str | None = None  # set on the rollout a version's recall started
    devices: dict[str, int]
    device_details: list[dict[str, Any]] | None = None
    last_evaluation: GateEvaluationPublic | None
    created_by: str
    created_at: UTCDatetime
    stage_started_at: UTCDatetime | None
    finished_at: datetime | None


def rollout_public(
    session: Session, rollout: Rollout, *, detail: bool = False, created: dict[str, int] | None = None
) -> RolloutPublic:
    """The rollout as the API shows it. `created`: members per status of a rollout this request
    created (it has no evaluation yet), which saves two queries on the path from promote to the
    devices: the publisher starts when the request commits."""
    model = session.get(Model, rollout.model_id)
    version = session.get(ModelVersion, rollout.version_id)
    counts = (
        list(created.items())
        if created is not None
        else session.exec(
            select(RolloutDevice.status, func.count())
            .where(RolloutDevice.rollout_id == rollout.id)
            .group_by(RolloutDevice.status)
        ).all()
    )
    details = None
    if detail:
        columns = ("device_id", "stage_index", "status", "reason", "artifact_sha256")
        table = RolloutDevice.__table__  # type: ignore[attr-defined]
        rows = session.execute(sa.select(*(table.c[c] for c in columns)).where(table.c.rollout_id == rollout.id)).all()
        details = [dict(zip(columns, row, strict=True)) for row in rows]
    last = None
    if created is None:
        last = session.exec(
            select(GateEvaluation)
            .where(GateEvaluation.rollout_id == rollout.id)
            .order_by(col(GateEvaluation.created_at).desc())
            .limit(1)
        ).first()
    plan = rollout.plan
    return RolloutPublic(
        id=rollout.id,
        model=model.name if model else "?",
        version=version.version if version else "?",
        selector=rollout.selector,
        state=rollout.state,
        stage_index=rollout.stage_index,
        stage=plan["stages"][rollout.stage_index]["name"],
        stages=plan["stages"],
        promotion=plan.get("promotion", "auto"),
        reason=rollout.reason,
        baseline_version=plan.get("baseline_version"),
        maintenance=plan.get("maintenance"),
        max_per_minute=plan.get("max_per_minute"),
        abort=plan.get("abort"),
        recall_of=plan.get("recall_of"),
        devices={status: int(n) for status, n in counts},
        device_details=details,
        last_evaluation=GateEvaluationPublic.model_validate(last, from_attributes=True) if last else None,
        created_by=rollout.created_by,
        created_at=rollout.created_at,
        stage_started_at=rollout.stage_started_at,
        finished_at=rollout.finished_at,
    )  # fmt: skip


def _wake(request: Request, *, tick: bool = True) -> None:
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is not None:
        fleet.wake(tick=tick)


def _get(session: Session, rollout_id: str, *, lock: bool = False) -> Rollout:
    """The rollout; with `lock`, its row locked until commit (the controller locks it for each step)."""
    rollout = session.get(Rollout, rollout_id, with_for_update=lock)
    if rollout is None:
        raise DomainError(ErrorCode.ROLLOUT_NOT_FOUND, f"no rollout with id {rollout_id}")
    return rollout


@router.post("", status_code=201, response_model=RolloutPublic)
def start_rollout(spec: RolloutCreate, request: Request, principal: OperatorDep, mutation: MutationDep) -> Any:
    """Start a staged rollout (default canary 5% -> 25% -> 100%, automatic promotion)."""
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    rollout, devices, states = create_rollout(mutation.session, spec=spec, created_by=principal.actor)
    mutation.audit(principal, "rollout.create", rollout.id, model=spec.model, version=spec.version)
    body = rollout_public(mutation.session, rollout, created=devices)
    fleet = getattr(request.app.state, "fleet", None)
    # The first stage's states go to the publisher as committed, not read back from the outbox.
    with fleet.handing_over(states) if fleet is not None else contextlib.nullcontext():
        mutation.commit(principal, 201, body)
    _wake(request, tick=False)  # the first stage is assigned: publish it, decide at the next tick
    return body


@router.get("")
def list_rollouts(
    session: SessionDep,
    _: ViewerDep,
    state: str | None = None,
    cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
) -> Any:
    stmt = select(Rollout)
    if state:
        stmt = stmt.where(Rollout.state == state)
    stmt = pagination.apply_page(stmt, Rollout.created_at, Rollout.id, cursor, limit)
    rows, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    return {"data": [rollout_public(session, r) for r in rows], "next_cursor": next_cursor}


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: str, session: SessionDep, _: ViewerDep) -> Any:
    return rollout_public(session, _get(session, rollout_id), detail=True)


@router.get("/{rollout_id}/evaluations", response_model=list[GateEvaluationPublic])
def list_evaluations(rollout_id: str, session: SessionDep, _: ViewerDep, limit: int = Query(100, ge=1, le=1000)) -> Any:
    _get(session, rollout_id)
    rows = session.exec(
        select(GateEvaluation)
        .where(GateEvaluation.rollout_id == rollout_id)
        .order_by(col(GateEvaluation.created_at).desc())
        .limit(limit)
    ).all()
    return [GateEvaluationPublic.model_validate(r, from_attributes=True) for r in rows]


@router.post("/{rollout_id}/{action}", response_model=RolloutPublic)
def change_rollout(
    rollout_id: str, action: str, request: Request, principal: OperatorDep, mutation: MutationDep
) -> Any:
    """`promote` (next stage now), `pause`, `resume`, `abort` (rolls touched devices back)."""
    session = mutation.session
    rollout = actions.apply(session, rollout_id, action, principal.actor)
    mutation.audit(principal, f"rollout.{action}", rollout.id)
    body = rollout_public(session, rollout)
    mutation.commit(principal, 200, body)
    _wake(request)
    return body
