"""An operator's rollout actions (promote, pause, resume, abort), shared by the API and the dashboard."""

from __future__ import annotations

from sqlmodel import Session

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Rollout, RolloutState
from control_plane.rollouts.controller import RolloutController
from control_plane.rollouts.plan import RolloutCreate

TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "promote": ((RolloutState.waiting_promotion, RolloutState.running), "advance to the next stage"),
    "pause": ((RolloutState.running, RolloutState.waiting_promotion), "pause"),
    "resume": ((RolloutState.paused,), "resume"),
    "abort": ((RolloutState.running, RolloutState.waiting_promotion, RolloutState.paused), "abort"),
}


def allowed_actions(rollout: Rollout) -> list[str]:
    """The actions the rollout's state allows now (promote only before its last stage)."""
    last = rollout.stage_index + 1 >= len(rollout.plan.get("stages") or [])
    return [a for a, (states, _) in TRANSITIONS.items() if rollout.state in states and not (a == "promote" and last)]


def apply(session: Session, rollout_id: str, action: str, actor: str) -> Rollout:
    """Lock the rollout and apply `action` (the controller locks it for each step too)."""
    if action not in TRANSITIONS:
        raise DomainError(
            ErrorCode.NOT_FOUND, f"unknown rollout action {action!r}; use promote, pause, resume or abort"
        )
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise DomainError(ErrorCode.ROLLOUT_NOT_FOUND, f"no rollout with id {rollout_id}")
    allowed, verb = TRANSITIONS[action]
    if rollout.state not in allowed:
        raise DomainError(
            ErrorCode.INVALID_STATE, f"cannot {verb} a rollout that is {rollout.state}", state=rollout.state
        )
    controller = RolloutController()
    if action == "promote":
        plan = RolloutCreate.model_validate(rollout.plan)
        if rollout.stage_index + 1 >= len(plan.stages):
            raise DomainError(ErrorCode.INVALID_STATE, "the rollout is already in its last stage")
        controller.next_stage(session, rollout)
    elif action == "pause":
        rollout.state = RolloutState.paused
    elif action == "resume":
        rollout.state = RolloutState.running
    else:
        controller.rollback(session, rollout, f"aborted by {actor}")
        rollout.state = RolloutState.aborted
    session.add(rollout)
    return rollout
