"""The state a device reports: which model it serves, which it keeps for rollback, what it is doing."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from shared import limits
from shared.base import WireModel
from shared.limits import MessageId, ModelName, Reason, Sha256, ShortName, VersionName

Phase = Literal[
    "idle",  # nothing asked of the device yet
    "downloading",
    "activating",  # loading and smoke-testing the pending model
    "on_trial",  # serving the new model until it has proved healthy
    "committed",
    "download_failed",
    "activation_failed",  # the new model failed to load or to pass its smoke test; the old one serves
    "rolled_back",
]


class ModelRef(WireModel):
    model: ModelName
    version: VersionName
    sha256: Sha256
    format: ShortName
    quantization: ShortName | None = None


class GoldenOutcome(WireModel):
    """How the version on trial did on its golden-prompt set, on this device's own runtime."""

    version: VersionName
    passed: int = Field(ge=0, le=limits.MAX_GOLDEN_PROMPTS)
    total: int = Field(ge=0, le=limits.MAX_GOLDEN_PROMPTS)
    # Ids of the prompts it failed.
    failed: list[ShortName] = Field(default_factory=list, max_length=limits.MAX_GOLDEN_PROMPTS)
    error: str | None = Field(default=None, max_length=500)  # the run itself failed (an engine fault)

    @model_validator(mode="after")
    def _passed_within_total(self) -> GoldenOutcome:
        if self.passed > self.total:
            raise ValueError("passed is more than total")
        return self

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


class DeviceState(WireModel):
    """Reported state. `desired_message_id` is the last desired-state message the device acted on."""

    device_id: str | None = Field(default=None, max_length=limits.ID_CHARS)
    phase: Phase = "idle"
    reason: Reason | None = None
    current: ModelRef | None = None
    previous: ModelRef | None = None
    pending: ModelRef | None = None
    desired_message_id: MessageId | None = None
    rollout_id: MessageId | None = None
    serving: bool = False  # whether a model is loaded and taking traffic
    golden: GoldenOutcome | None = None  # the golden-prompt run of the latest activation
    updated_at: datetime | None = None
