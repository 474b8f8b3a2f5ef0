"""The agent's durable state: current, previous and pending models, written atomically.

The state file is the single truth after a crash: a model is `current` only once it has been
verified, loaded, smoke-tested and switched to, so a restart serves exactly that model.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from edge_agent.fsutil import write_atomic
from shared.desired import DesiredState
from shared.state import DeviceState, GoldenOutcome, ModelRef, Phase

log = logging.getLogger(__name__)


class AgentState(BaseModel):
    """What the agent persists; `to_wire` gives the reported DeviceState."""

    current: DesiredState | None = None
    previous: DesiredState | None = None
    pending: DesiredState | None = None
    phase: Phase = "idle"
    reason: str | None = None
    desired_message_id: str | None = None
    activation_attempts: int = 0  # counted before each try, so a crash loop stops
    trial_started_at: float | None = None  # wall clock; the trial survives a restart
    golden: GoldenOutcome | None = None  # the golden-set run of the latest activation

    def to_wire(self, *, device_id: str | None, serving: bool) -> DeviceState:
        return DeviceState(
            device_id=device_id,
            phase=self.phase,
            reason=self.reason,
            current=model_ref(self.current),
            previous=model_ref(self.previous),
            pending=model_ref(self.pending),
            desired_message_id=self.desired_message_id,
            rollout_id=latest.rollout_id if (latest := self.pending or self.current) else None,
            serving=serving,
            updated_at=datetime.now(UTC),
            golden=self.golden,
        )


def model_ref(desired: DesiredState | None) -> ModelRef | None:
    if desired is None:
        return None
    return ModelRef(
        model=desired.model,
        version=desired.version,
        sha256=desired.artifact.sha256,
        format=desired.artifact.format,
        quantization=desired.artifact.quantization,
    )


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        try:
            return AgentState.model_validate_json(raw)
        except ValidationError as exc:
            # Atomic writes make this unexpected (disk corruption, hand edits); start clean, loudly.
            log.error("state file %s is unreadable, starting without a model: %s", self.path, exc)
            return AgentState()

    def save(self, state: AgentState) -> None:
        write_atomic(self.path, state.model_dump_json(indent=2).encode())
