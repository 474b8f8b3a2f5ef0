"""The rollout controller: one `tick()` moves every active rollout one step, from state in SQL.

Everything it knows lives in the database, so a killed control plane resumes where it was; the
desired states it writes go through the outbox (`desired_states`), never straight to MQTT.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from control_plane.errors import DomainError
from control_plane.models import (
    ACTIVE_STATES,
    Artifact,
    DesiredStateRow,
    Device,
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutState,
    as_utc,
    utcnow,
)
from control_plane.rollouts import assign, gates
from control_plane.rollouts.plan import RolloutCreate
from control_plane.rollouts.variants import choose_variant
from control_plane.services import registry
from control_plane.services.eval_metrics import quality_retention
from control_plane.services.selectors import parse_selector, selector_clauses

log = logging.getLogger("slmops.rollouts")
ENROLLED = ("online", "offline")
BASELINE_LOOKBACK = timedelta(minutes=30)


def target_devices(session: Session, selector: str) -> list[Device]:
    stmt = select(Device).where(col(Device.status).in_(ENROLLED))
    for clause in selector_clauses(parse_selector(selector)):
        stmt = stmt.where(clause)
    return list(session.exec(stmt).all())


def check_quality_floor(session: Session, spec: RolloutCreate, version: ModelVersion) -> None:
    """Refuse a version measured below the plan's floor; one never measured is not refused."""
    floor = spec.min_quality_retention
    retention = quality_retention(session, version)
    if floor is None or retention is None or retention >= floor:
        return
    raise DomainError(
        "quality_below_floor",
        f"{spec.model}@{spec.version} keeps {retention:.1%} of its parent's quality, below the floor of "
        f"{floor:.1%}; set force to roll it out anyway",
        quality_retention=retention,
        min_quality_retention=floor,
        evaluated_against=(version.eval_metrics or {}).get("evaluated_against"),
    )


def create_rollout(session: Session, *, spec: RolloutCreate, created_by: str) -> Rollout:
    model, version = registry.get_version(session, spec.model, spec.version)
    if version.status == "revoked":
        raise DomainError("invalid_state", f"{spec.model}@{spec.version} is revoked")
    if not spec.force:
        check_quality_floor(session, spec, version)
    devices = target_devices(session, spec.selector)
    if not devices:
        raise DomainError("validation_error", "no enrolled device matches the selector", selector=spec.selector)
    ids = {d.id for d in devices}
    for other in session.exec(
        select(Rollout).where(Rollout.model_id == model.id, col(Rollout.state).in_(ACTIVE_STATES))
    ):
        members = session.exec(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == other.id)).all()
        if ids & set(members):
            raise DomainError(
                "rollout_conflict",
                "an active rollout of this model covers some of these devices",
                rollout_id=other.id,
            )
    baseline = Counter(
        r.version
        for r in session.exec(select(DesiredStateRow).where(col(DesiredStateRow.device_id).in_(ids)))
        if r.model == model.name
    ).most_common(1)
    plan = spec.model_dump(mode="json") | {"baseline_version": baseline[0][0] if baseline else None}
    rollout = Rollout(
        model_id=model.id,
        version_id=version.id,
        selector=spec.selector,
        plan=plan,
        created_by=created_by,
        stage_started_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(rollout)
    session.flush()
    for device in devices:
        order = hashlib.sha256(f"{rollout.id}:{device.id}".encode()).hexdigest()
        session.add(RolloutDevice(rollout_id=rollout.id, device_id=device.id, order_key=order))
    session.flush()
    return rollout


class RolloutController:
    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._now = clock  # injectable, so bake times can be tested without sleeping

    def tick(self, session: Session) -> int:
        """Advance every running rollout once; returns how many were looked at."""
        rollouts = session.exec(select(Rollout).where(col(Rollout.state).in_(ACTIVE_STATES))).all()
        for rollout in rollouts:
            try:
                self.advance(session, rollout)
                session.commit()
            except Exception:  # one broken rollout must not stop the others
                session.rollback()
                log.exception("rollout %s: controller step failed", rollout.id)
        return len(rollouts)

    def advance(self, session: Session, rollout: Rollout) -> None:
        plan = RolloutCreate.model_validate(rollout.plan)
        model = session.get(Model, rollout.model_id)
        version = session.get(ModelVersion, rollout.version_id)
        assert model is not None and version is not None
        members = self._members(session, rollout)
        # Load every member's device and desired state in two queries; the session.get() calls
        # below are then answered from the identity map (these lists keep the objects alive).
        devices, desired_rows = self._preload(session, [m.device_id for m in members])
        self._refresh_statuses(session, rollout, members)
        self._cover_newcomers(session, rollout, plan, model, members)
        if rollout.state != RolloutState.running:
            return
        size = plan.stages[rollout.stage_index].cumulative_size(len(members))
        artifacts, adapter = assign.deployable_artifacts(session, version)
        with session.no_autoflush:  # one flush at commit instead of one per device
            for member in members[:size]:
                if member.stage_index < 0:
                    self._assign(
                        session,
                        rollout,
                        member,
                        model,
                        version,
                        (artifacts, adapter),
                        devices[member.device_id],
                        desired_rows,
                    )
        touched = [m for m in members if m.stage_index >= 0]
        result = self._evaluate(session, rollout, plan, version, members, touched)
        if result.result == gates.FAIL:
            failed = [c["gate"] for c in result.details["checks"] if c["result"] == gates.FAIL]
            self.rollback(
                session,
                rollout,
                f"gate failed in stage {plan.stages[rollout.stage_index].name}: " + ", ".join(failed),
            )
        elif result.result == gates.PASS and self._baked(rollout, plan):
            self._stage_passed(session, rollout, plan)
            if rollout.state == RolloutState.completed:
                self._cover_newcomers(session, rollout, plan, model, members)

    @staticmethod
    def _preload(session: Session, device_ids: list[str]) -> tuple[dict[str, Device], dict[str, DesiredStateRow]]:
        """Members' devices and desired states, in a few queries instead of two per device."""
        devices: dict[str, Device] = {}
        desired: dict[str, DesiredStateRow] = {}
        for start in range(0, len(device_ids), 900):
            chunk = device_ids[start : start + 900]
            devices.update((d.id, d) for d in session.exec(select(Device).where(col(Device.id).in_(chunk))))
            for row in session.exec(select(DesiredStateRow).where(col(DesiredStateRow.device_id).in_(chunk))):
                desired[row.device_id] = row
        return devices, desired

    def _members(self, session: Session, rollout: Rollout) -> list[RolloutDevice]:
        stmt = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id).order_by(RolloutDevice.order_key)
        return list(session.exec(stmt).all())

    def _assign(
        self,
        session: Session,
        rollout: Rollout,
        member: RolloutDevice,
        model: Model,
        version: ModelVersion,
        deployable: tuple[list[Artifact], Artifact | None],
        device: Device,
        desired_rows: dict[str, DesiredStateRow],
    ) -> None:
        member.stage_index = rollout.stage_index
        member.assigned_at = self._now()
        artifacts, adapter = deployable
        artifact, why = choose_variant(artifacts, device.hardware)
        if artifact is None:
            member.status, member.reason = "incompatible", why
        else:
            previous = desired_rows.get(device.id)
            member.previous_desired = dict(previous.payload) if previous else None
            payload = assign.desired_payload(model, version, artifact, rollout.id, adapter)
            state = desired_rows[device.id] = assign.set_desired(session, device, payload, previous)
            member.status, member.artifact_sha256 = "assigned", state.artifact_sha256
        session.add(member)

    def _refresh_statuses(self, session: Session, rollout: Rollout, members: list[RolloutDevice]) -> None:
        pending = [m for m in members if m.status == "assigned"]
        if not pending:
            return
        devices = {
            d.id: d for d in session.exec(select(Device).where(col(Device.id).in_([m.device_id for m in pending])))
        }
        for member in pending:
            device = devices.get(member.device_id)
            desired = assign.current_desired(session, member.device_id)
            if device is None or desired is None or desired.rollout_id != rollout.id:
                continue
            # With an adapter the base sha256 is already current before the adapter loads: the version says.
            same_version = desired.payload.get("adapter") is None or device.current_version == desired.version
            if (
                device.current_sha256 == member.artifact_sha256
                and same_version
                and device.phase in ("on_trial", "committed")
            ):
                member.status, member.reason = "active", ""
            elif device.acked_message_id == desired.message_id and device.phase in (
                "activation_failed",
                "download_failed",
            ):
                member.status, member.reason = "failed", device.phase_reason or device.phase or ""
            else:
                continue
            session.add(member)

    def _evaluate(
        self,
        session: Session,
        rollout: Rollout,
        plan: RolloutCreate,
        version: ModelVersion,
        members: list[RolloutDevice],
        touched: list[RolloutDevice],
    ) -> gates.GateResult:
        stage_since = as_utc(rollout.stage_started_at) or self._now()
        baseline_ids = [m.device_id for m in members if m.status in ("waiting", "incompatible")]
        if not baseline_ids:  # last stage: compare with what all devices did before the rollout
            baseline_ids = [m.device_id for m in members]
        result = gates.evaluate(
            session,
            gates=plan.gates_for(rollout.stage_index),
            members=touched,
            new_version=version.version,
            baseline_version=rollout.plan.get("baseline_version"),
            baseline_device_ids=baseline_ids,
            stage_since=stage_since,
            baseline_since=(as_utc(rollout.created_at) or stage_since) - BASELINE_LOOKBACK,
        )
        session.add(
            GateEvaluation(
                rollout_id=rollout.id,
                stage_index=rollout.stage_index,
                result=result.result,
                details=result.details,
            )
        )
        return result

    def _baked(self, rollout: Rollout, plan: RolloutCreate) -> bool:
        started = as_utc(rollout.stage_started_at) or self._now()
        return self._now() - started >= timedelta(seconds=plan.stages[rollout.stage_index].min_bake_s)

    def _stage_passed(self, session: Session, rollout: Rollout, plan: RolloutCreate) -> None:
        if rollout.stage_index + 1 >= len(plan.stages):
            self._finish(session, rollout, RolloutState.completed, "all stages passed their gates")
        elif plan.promotion == "manual":
            rollout.state = RolloutState.waiting_promotion
        else:
            self.next_stage(session, rollout)
        rollout.updated_at = self._now()
        session.add(rollout)

    def next_stage(self, session: Session, rollout: Rollout) -> None:
        rollout.stage_index += 1
        rollout.stage_started_at = self._now()
        rollout.state = RolloutState.running
        rollout.updated_at = self._now()
        session.add(rollout)

    def rollback(self, session: Session, rollout: Rollout, reason: str) -> None:
        """Every touched device returns to the desired state it had before this rollout."""
        for member in self._members(session, rollout):
            if member.stage_index < 0 or member.status in ("incompatible", "rolled_back"):
                continue
            device = session.get(Device, member.device_id)
            desired = assign.current_desired(session, member.device_id)
            if device is not None and member.previous_desired and desired and desired.rollout_id == rollout.id:
                assign.restore_desired(session, device, member.previous_desired)
            member.status = "rolled_back"
            session.add(member)
        self._finish(session, rollout, RolloutState.rolled_back, reason)
        log.warning("rollout %s rolled back: %s", rollout.id, reason)

    def _finish(self, session: Session, rollout: Rollout, state: RolloutState, reason: str) -> None:
        rollout.state = state
        rollout.reason = reason
        rollout.finished_at = rollout.updated_at = self._now()
        session.add(rollout)

    def _cover_newcomers(
        self,
        session: Session,
        rollout: Rollout,
        plan: RolloutCreate,
        model: Model,
        members: list[RolloutDevice],
    ) -> None:
        """Devices that enrolled after the rollout began get the stable version until it completes,
        then the new one (they were never part of the stages, so never part of the risk)."""
        completed = rollout.state == RolloutState.completed
        baseline = rollout.plan.get("baseline_version")
        stable = plan.version if completed else baseline
        if stable is None:
            return
        known = {m.device_id for m in members}
        _, version = registry.get_version(session, model.name, stable)
        artifacts, adapter = assign.deployable_artifacts(session, version)
        for device in target_devices(session, rollout.selector):
            if device.id in known:
                continue
            current = assign.current_desired(session, device.id)
            on_baseline = current is not None and current.rollout_id is None and current.version == baseline
            if current is not None and not (completed and on_baseline):
                continue
            artifact, _ = choose_variant(artifacts, device.hardware)
            if artifact is not None:
                payload = assign.desired_payload(model, version, artifact, None, adapter)
                assign.set_desired(session, device, payload, current)
