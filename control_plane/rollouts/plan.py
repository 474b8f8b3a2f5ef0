"""Rollout plans: stages with sizes, bake times and gates. Default: canary 5% -> 25% -> 100%."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from control_plane.rollouts.schedule import AbortThreshold, Maintenance


class Gates(BaseModel):
    """Limits a stage must meet. Absolute limits and ratios to the baseline (devices on the old version)."""

    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    max_p95_latency_ratio: float | None = Field(default=1.5, gt=0, description="new p95 / baseline p95")
    max_error_rate: float | None = Field(default=0.05, ge=0, le=1)
    max_rss_mb: float | None = Field(default=None, gt=0)
    min_activated_fraction: float = Field(default=1.0, ge=0, le=1)
    min_samples: int = Field(default=20, ge=1, description="requests needed before latency/error gates decide")
    warmup_windows: int = Field(default=1, ge=0, description="first telemetry windows per device ignored")
    min_reporting_share: float = Field(
        default=0.5, ge=0, le=1, description="share of active devices (at least one) reporting before telemetry decides"
    )


class Stage(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    min_bake_s: float = Field(default=60, ge=0)
    gates: Gates | None = None  # None: the plan's gates

    @model_validator(mode="after")
    def _one_size(self) -> Stage:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a stage needs exactly one of percent or count")
        return self

    def cumulative_size(self, total: int) -> int:
        """How many of `total` target devices this stage covers (at least one when total > 0)."""
        if total == 0:
            return 0
        wanted = self.count if self.count is not None else math.ceil(total * (self.percent or 0) / 100)
        return max(1, min(total, wanted))


def default_stages() -> list[Stage]:
    return [
        Stage(name="canary", percent=5),
        Stage(name="wave", percent=25),
        Stage(name="fleet", percent=100),
    ]


class RolloutCreate(BaseModel):
    model: str
    version: str
    selector: str = Field(default="", max_length=500, description="label selector; empty: every device")
    stages: list[Stage] = Field(default_factory=default_stages, min_length=1, max_length=20)
    gates: Gates = Field(default_factory=Gates)
    promotion: Literal["auto", "manual"] = "auto"
    min_quality_retention: float | None = Field(
        default=0.9, ge=0, le=1, description="refuse versions whose measured quality retention is lower; None: off"
    )
    force: bool = Field(default=False, description="start even if quality checks would refuse it")
    maintenance: Maintenance | None = Field(default=None, description="daily windows devices may be updated in")
    max_per_minute: int | None = Field(default=None, ge=1, le=1000, description="devices given the version per minute")
    abort: AbortThreshold | None = Field(default=None, description="abort on this share of failed activations")

    @model_validator(mode="after")
    def _last_stage_covers_all(self) -> RolloutCreate:
        last = self.stages[-1]
        if last.percent != 100:
            raise ValueError("the last stage must cover 100 percent of the target devices")
        return self

    def gates_for(self, stage_index: int) -> Gates:
        return self.stages[stage_index].gates or self.gates
