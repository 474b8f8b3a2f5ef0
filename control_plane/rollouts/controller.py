"""The rollout controller: one `tick()` moves every active rollout one step, from state in SQL.

Everything it knows lives in the database, so a killed control plane resumes where it was; the
desired states it writes go through the outbox (`desired_states`), never straight to MQTT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlmodel import Session, col, select

from control_plane.db import bulk
from control_plane.models import (
    ACTIVE_STATES,
    DEPLOYABLE_STATUSES,
    Artifact,
    DesiredStateRow,
    Device,
    GateEvaluation,
    Model,
    ModelVersion,
    Rollout,
    RolloutState,
    as_utc,
    utcnow,
)
from control_plane.rollouts import assign, gate_samples, gates, schedule
from control_plane.rollouts import members as members_
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import RolloutCreate
from control_plane.rollouts.variants import choose_variant, hardware_class
from control_plane.services import registry
from control_plane.services.selectors import parse_selector, selector_clauses

log = logging.getLogger("slmops.rollouts")
ENROLLED = ("online", "offline")
# Bulk reads select the table's columns, not the model's attributes, which SQLAlchemy loads per
# row (ADR 0006).
DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]
BASELINE_LOOKBACK = timedelta(minutes=30)
ANALYZE_AT = 1000  # members from which a rollout's table statistics are refreshed (see _analyze_once)
_NO_PROFILE: dict[str, Any] = {}  # a device that reported no hardware: one class, one shared dict
_ACTIVE_PHASES = ("on_trial", "committed")  # serving the assigned artifact: the member is active
_FAILED_PHASES = ("activation_failed", "download_failed")  # having acted on its desired state: failed


def enrolled_matching(selector: str, *columns: Any) -> sa.Select[Any]:
    """`columns` of the enrolled devices the selector matches."""
    stmt = sa.select(*columns).where(DEVICES.c.status.in_(ENROLLED))
    for clause in selector_clauses(parse_selector(selector)):
        stmt = stmt.where(clause)
    return stmt


def hardware_json() -> Any:
    """The devices' hardware column as its JSON text, for `HardwareProfiles` to parse."""
    return sa.cast(DEVICES.c.hardware, sa.Text)


class HardwareProfiles(dict[str, dict[str, Any]]):
    """device id -> hardware profile, from (device id, profile as JSON text) rows.

    A fleet has few distinct profiles: each text is parsed once and its dict shared by the devices
    that report it (read-only), and `hardware_class` is worked out once per dict, not per device
    (docs/performance.md#fleet-paths)."""

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[str | None, dict[str, Any]] = {}
        self._classes: dict[int, tuple[Any, ...]] = {}

    def add(self, device_id: str, text: str | None) -> dict[str, Any]:
        if (profile := self._parsed.get(text)) is None:
            profile = self._parsed[text] = dict(orjson.loads(text) or {}) if text else {}
        self[device_id] = profile
        return profile

    def class_of(self, profile: dict[str, Any]) -> tuple[Any, ...]:
        if (key := self._classes.get(id(profile))) is None:
            key = self._classes[id(profile)] = hardware_class(profile)
        return key


class RolloutController:
    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._now = clock  # injectable, so bake times can be tested without sleeping
        self._analyzed: set[str] = set()  # large rollouts whose members the planner has been shown

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
        try:
            self.cover_late_enrollments(session)
            session.commit()
        except Exception:
            session.rollback()
            log.exception("giving late-enrolled devices their desired state failed")
        return len(rollouts)

    def cover_late_enrollments(self, session: Session, lookback: int = 20) -> int:
        """Devices enrolled after a rollout completed, with no desired state yet, get the version of
        the latest completed rollout whose selector they match (an active rollout covers its own
        newcomers). Returns how many were given one."""
        table = DesiredStateRow.__table__  # type: ignore[attr-defined]
        waiting = select(Device.id).where(
            col(Device.status).in_(ENROLLED), col(Device.id).not_in(sa.select(table.c.device_id))
        )
        given = 0
        if session.exec(waiting.limit(1)).first() is None:
            return given  # the usual case: one cheap anti-join per tick
        completed = session.exec(
            select(Rollout)
            .where(Rollout.state == RolloutState.completed)
            .order_by(col(Rollout.finished_at).desc())
            .limit(lookback)
        ).all()
        for rollout in completed:
            stmt = waiting  # re-evaluated per rollout: devices given a state above are no longer waiting
            for clause in selector_clauses(parse_selector(rollout.selector)):
                stmt = stmt.where(clause)
            matching = list(session.exec(stmt).all())
            model = session.get(Model, rollout.model_id)
            version = session.get(ModelVersion, rollout.version_id)
            # A recall rollout moved the devices that ran a version, not a selector's every device.
            if rollout.plan.get("recall_of") or not matching or model is None or version is None:
                continue
            if version.status not in DEPLOYABLE_STATUSES:
                continue
            states = self._stable_states(session, model, version, matching)
            assign.write_desired(session, states)
            given += len(states)
        return given

    def _stable_states(
        self, session: Session, model: Model, version: ModelVersion, device_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Desired states of `version` outside any rollout, for the devices it has a fitting variant for."""
        artifacts, adapter = assign.deployable_artifacts(session, version)
        hardware = self._hardware(session, device_ids)
        templates: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Any]] = {}
        for device_id in device_ids:
            artifact, _ = choose_variant(artifacts, hardware.get(device_id) or {})
            if artifact is None:
                continue
            if artifact.sha256 not in templates:
                state = assign.desired_payload(model, version, artifact, None, adapter, variants=artifacts)
                templates[artifact.sha256] = state.model_dump(mode="json")
            states[device_id] = assign.with_message_id(templates[artifact.sha256])
        return states

    def advance(self, session: Session, rollout: Rollout) -> None:
        # The row stays locked until the caller commits: an operator's pause, promote or abort
        # (which lock it too) waits for this step instead of interleaving with it.
        session.refresh(rollout, with_for_update=True)
        if rollout.state not in ACTIVE_STATES:
            return
        plan = RolloutCreate.model_validate(rollout.plan)
        model = session.get(Model, rollout.model_id)
        version = session.get(ModelVersion, rollout.version_id)
        assert model is not None and version is not None
        members = self._members(session, rollout)
        self._analyze_once(session, rollout, members)
        self._refresh_statuses(session, rollout, version, members)
        self._cover_newcomers(session, rollout, plan, model)
        if rollout.state != RolloutState.running:
            return
        if (why := schedule.should_abort(plan.abort, members)) is not None:
            self.rollback(session, rollout, why)
            rollout.state = RolloutState.aborted
            return
        size = plan.stages[rollout.stage_index].cumulative_size(len(members))
        unassigned = [m for m in members[:size] if m.stage_index < 0]
        if unassigned:
            # Gates are evaluated once the whole stage is assigned, from the next tick: the caller
            # commits now and the publisher sends the new desired states without waiting.
            self._admit(session, rollout, plan, members, unassigned, model, version)
            return
        touched = [m for m in members if m.stage_index >= 0]
        result = self._evaluate(session, rollout, plan, version, members, touched)
        if result.result == gates.FAIL:
            self.rollback(
                session,
                rollout,
                f"gate failed in stage {plan.stages[rollout.stage_index].name}: " + ", ".join(result.failed()),
            )
        elif result.result == gates.PASS and self._baked(session, rollout, plan, members):
            self._stage_passed(session, rollout, plan)
            if rollout.state == RolloutState.completed:
                self._cover_newcomers(session, rollout, plan, model)

    def _admit(
        self,
        session: Session,
        rollout: Rollout,
        plan: RolloutCreate,
        members: list[Member],
        unassigned: list[Member],
        model: Model,
        version: ModelVersion,
    ) -> None:
        """Assign the stage's devices that are inside their window, as fast as the rate allows."""
        given = sum(m.stage_index == rollout.stage_index for m in members)
        started = as_utc(rollout.stage_started_at) or self._now()
        admitted, held = schedule.admit(session, plan, unassigned, now=self._now(), stage_started=started, given=given)
        outside = {m.device_id for m in held}
        changes = []
        for member in unassigned:
            status = schedule.WAITING_WINDOW if member.device_id in outside else "waiting"
            if member.status != status and member not in admitted:
                member.status = status
                changes.append({"device_id": member.device_id, "status": status})
        members_.save(session, rollout.id, changes)
        if admitted:
            self._assign(session, rollout, admitted, model, version, assign.deployable_artifacts(session, version))

    @staticmethod
    def _hardware(session: Session, device_ids: list[str]) -> HardwareProfiles:
        out = HardwareProfiles()
        for clause in bulk.matching(session, DEVICES.c.id, device_ids):
            for device_id, text in session.execute(sa.select(DEVICES.c.id, hardware_json()).where(clause)).all():
                out.add(device_id, text)
        return out

    @staticmethod
    def _desired(session: Session, device_ids: list[str]) -> dict[str, tuple[str | None, dict[str, Any]]]:
        """device id -> (rollout id, payload) of its current desired state."""
        out: dict[str, tuple[str | None, dict[str, Any]]] = {}
        table = DesiredStateRow.__table__  # type: ignore[attr-defined]
        for clause in bulk.matching(session, table.c.device_id, device_ids):
            stmt = sa.select(table.c.device_id, table.c.rollout_id, table.c.payload).where(clause)
            out.update((d, (r, p)) for d, r, p in session.execute(stmt).all())
        return out

    def _analyze_once(self, session: Session, rollout: Rollout, members: list[Member]) -> None:
        """Refresh PostgreSQL's statistics of `rollout_devices` once per large rollout.

        Until autovacuum gets to it, the planner still believes what it saw before the rollout's
        members arrived, and nested-loops them (docs/performance.md#controller-ticks)."""
        if len(members) < ANALYZE_AT or rollout.id in self._analyzed or session.get_bind().dialect.name != "postgresql":
            return
        session.execute(sa.text("ANALYZE rollout_devices"))
        self._analyzed.add(rollout.id)

    def _members(self, session: Session, rollout: Rollout) -> list[Member]:
        return members_.load(session, rollout.id)

    def _assign(
        self,
        session: Session,
        rollout: Rollout,
        members: list[Member],
        model: Model,
        version: ModelVersion,
        deployable: tuple[list[Artifact], Artifact | None],
    ) -> None:
        """Give `members` the rollout's version: one validated payload per artifact, bulk writes."""
        states, changes = self.assignments(
            rollout, members, model, version, deployable, self._hardware(session, [m.device_id for m in members])
        )
        # Assigned members keep what a rollback restores; incompatible ones have nothing to restore.
        members_.save(session, rollout.id, [c for c in changes if c["device_id"] in states], keep_previous_desired=True)
        members_.save(session, rollout.id, [c for c in changes if c["device_id"] not in states])
        assign.write_desired(session, states)

    def assignments(
        self,
        rollout: Rollout,
        members: list[Member],
        model: Model,
        version: ModelVersion,
        deployable: tuple[list[Artifact], Artifact | None],
        hardware: HardwareProfiles,
    ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """(desired states, member changes) that give `members` the rollout's current stage; the
        members are updated in place. `hardware` holds at least these devices' profiles. The
        caller saves the changes (keeping each assigned device's previous desired state), then
        writes the states."""
        artifacts, adapter = deployable
        now = self._now()
        templates: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Any]] = {}
        changes: list[dict[str, Any]] = []
        stage_index = rollout.stage_index  # ORM attributes are read once, not per member
        # A fleet has few hardware classes: the variant is chosen once per class, not per device,
        # as (status, reason, sha256, desired-state template or None).
        chosen: dict[tuple[Any, ...], tuple[str, str, str | None, dict[str, Any] | None]] = {}
        for member in members:
            profile = hardware.get(member.device_id) or _NO_PROFILE
            key = hardware.class_of(profile)
            if (choice := chosen.get(key)) is None:
                artifact, why = choose_variant(artifacts, profile)
                if artifact is None:
                    choice = ("incompatible", why, None, None)
                else:
                    if (template := templates.get(artifact.sha256)) is None:
                        state = assign.desired_payload(
                            model, version, artifact, rollout.id, adapter, variants=artifacts
                        )
                        template = templates[artifact.sha256] = state.model_dump(mode="json")
                    choice = ("assigned", "", artifact.sha256, template)
                chosen[key] = choice
            status, reason, sha256, template = choice
            changes.append(
                {"device_id": member.device_id, "stage_index": stage_index, "assigned_at": now, "status": status,
                 "reason": reason, "artifact_sha256": sha256}
            )  # fmt: skip
            if template is not None:
                states[member.device_id] = assign.with_message_id(template)
            member.stage_index, member.status, member.artifact_sha256 = stage_index, status, sha256
        return states, changes

    def _refresh_statuses(
        self, session: Session, rollout: Rollout, version: ModelVersion, members: list[Member]
    ) -> None:
        pending = {m.device_id: m for m in members if m.status == "assigned"}
        if not pending:
            return
        # With an adapter the base sha256 is already current before the adapter loads: the version says.
        check_version = assign.deployable_artifacts(session, version)[1] is not None
        table = DesiredStateRow.__table__  # type: ignore[attr-defined]
        dev, member = DEVICES, members_.TABLE.c
        # Only the members whose device reports a phase that can settle them, not every device of
        # the stage (docs/performance.md#controller-ticks). The phases are the ones decided on below.
        stmt = (
            sa.select(
                dev.c.id,
                dev.c.current_sha256,
                dev.c.current_version,
                dev.c.phase,
                dev.c.phase_reason,
                dev.c.acked_message_id,
                table.c.message_id,
                table.c.version,
            )
            .join_from(members_.TABLE, dev, dev.c.id == member.device_id)
            .join(table, table.c.device_id == dev.c.id)
            .where(
                member.rollout_id == rollout.id,
                member.status == "assigned",
                table.c.rollout_id == rollout.id,
                dev.c.phase.in_(_ACTIVE_PHASES + _FAILED_PHASES),
            )
        )
        changes: list[dict[str, Any]] = []
        for device_id, sha, current_version, phase, reason, acked, message_id, desired_version in session.execute(
            stmt
        ).all():
            if (pending_member := pending.get(device_id)) is None:
                continue
            same_version = not check_version or current_version == desired_version
            if sha == pending_member.artifact_sha256 and same_version and phase in _ACTIVE_PHASES:
                pending_member.status = "active"
                changes.append({"device_id": device_id, "status": "active", "reason": ""})
            elif acked == message_id and phase in _FAILED_PHASES:
                pending_member.status = "failed"
                changes.append({"device_id": device_id, "status": "failed", "reason": reason or phase or ""})
        members_.save(session, rollout.id, changes)

    def _evaluate(
        self,
        session: Session,
        rollout: Rollout,
        plan: RolloutCreate,
        version: ModelVersion,
        members: list[Member],
        touched: list[Member],
    ) -> gates.GateDecision:
        stage_since = as_utc(rollout.stage_started_at) or self._now()
        not_given = ("waiting", "incompatible", schedule.WAITING_WINDOW)
        baseline_ids = [m.device_id for m in members if m.status in not_given]
        if not baseline_ids:  # last stage: compare with what all devices did before the rollout
            baseline_ids = [m.device_id for m in members]
        limits = plan.gates_for(rollout.stage_index)
        samples = gate_samples.collect(
            session,
            rollout_id=rollout.id,
            gates=limits,
            members=touched,
            new_version=version.version,
            baseline_version=rollout.plan.get("baseline_version"),
            baseline_device_ids=baseline_ids,
            stage_since=stage_since,
            baseline_since=(as_utc(rollout.created_at) or stage_since) - BASELINE_LOOKBACK,
        )
        result = gates.decide(limits, samples)
        session.add(
            GateEvaluation(
                rollout_id=rollout.id,
                stage_index=rollout.stage_index,
                result=result.result.value,
                details=result.details,
            )
        )
        return result

    def _baked(self, session: Session, rollout: Rollout, plan: RolloutCreate, members: list[Member]) -> bool:
        """With windows, only the time some of the stage's devices were inside theirs counts."""
        started = as_utc(rollout.stage_started_at) or self._now()
        bake_s = plan.stages[rollout.stage_index].min_bake_s
        if plan.maintenance is None:
            return self._now() - started >= timedelta(seconds=bake_s)
        stage = [m.device_id for m in members if m.stage_index == rollout.stage_index]
        zones = set(schedule.zones(session, stage, plan.maintenance).values())
        return schedule.open_seconds(plan.maintenance, zones, started, self._now()) >= bake_s

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
        touched = [
            m
            for m in self._members(session, rollout)
            if m.stage_index >= 0 and m.status not in ("incompatible", "rolled_back")
        ]
        ids = [m.device_id for m in touched]
        desired, previous = self._desired(session, ids), members_.previous_desired(session, rollout.id, ids)
        restored: dict[str, dict[str, Any]] = {}
        for member in touched:
            current = desired.get(member.device_id)
            if current is not None and current[0] == rollout.id:
                # A device with nothing to go back to stops serving what this rollout gave it.
                before = previous.get(member.device_id)
                restored[member.device_id] = (
                    assign.restore_desired(before) if before else assign.unload_desired(current[1])
                )
            member.status = "rolled_back"
        assign.write_desired(session, restored)
        members_.save(session, rollout.id, [{"device_id": d, "status": "rolled_back"} for d in ids])
        self._finish(session, rollout, RolloutState.rolled_back, reason)
        log.warning("rollout %s rolled back: %s", rollout.id, reason)

    def _finish(self, session: Session, rollout: Rollout, state: RolloutState, reason: str) -> None:
        table = members_.TABLE
        held = sa.and_(table.c.rollout_id == rollout.id, table.c.status == schedule.WAITING_WINDOW)
        session.execute(sa.update(table).where(held).values(status="waiting"))  # nobody waits for it now
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
    ) -> None:
        """Devices that enrolled after the rollout began get the stable version until it completes,
        then the new one (they were never part of the stages, so never part of the risk)."""
        if rollout.plan.get("recall_of"):
            return  # it moves the devices that ran the recalled version; nobody else joins it
        completed = rollout.state == RolloutState.completed
        baseline = rollout.plan.get("baseline_version")
        stable = plan.version if completed else baseline
        if stable is None:
            return
        # Matching devices that are not members, found by the database, not compared in Python
        # (docs/performance.md#controller-ticks).
        member = members_.TABLE.c
        not_member = ~sa.exists().where(member.rollout_id == rollout.id, member.device_id == DEVICES.c.id)
        newcomers = list(session.execute(enrolled_matching(rollout.selector, DEVICES.c.id).where(not_member)).scalars())
        if not newcomers:
            return
        _, version = registry.get_version(session, model.name, stable)
        desired = self._desired(session, newcomers)
        # A device relabelled into the selector may still hold what an earlier, finished rollout gave it.
        active: set[str] = set()
        if completed:
            active = set(session.exec(select(Rollout.id).where(col(Rollout.state).in_(ACTIVE_STATES))))
        due = []
        for device_id in newcomers:
            current = desired.get(device_id)
            on_baseline = current is not None and current[0] not in active and current[1].get("version") == baseline
            if current is None or (completed and on_baseline):
                due.append(device_id)
        if due:
            assign.write_desired(session, self._stable_states(session, model, version, due))
