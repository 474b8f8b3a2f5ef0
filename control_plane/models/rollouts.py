"""Rollouts, their per-device assignments, gate evaluations, and each device's desired state.

`DesiredStateRow` is the outbox: the controller writes it in the same transaction as the rollout
change, and the publisher sends it (retained) until `published_message_id` catches up. A restart
therefore never loses a desired state and never publishes two conflicting ones.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field, ts_field


class RolloutState(StrEnum):
    running = "running"
    waiting_promotion = "waiting_promotion"  # manual plans: gates passed, an operator must promote
    paused = "paused"
    completed = "completed"
    rolled_back = "rolled_back"
    aborted = "aborted"


ACTIVE_STATES = (RolloutState.running, RolloutState.waiting_promotion, RolloutState.paused)


class Rollout(SQLModel, table=True):
    __tablename__ = "rollouts"

    id: str = id_field()
    model_id: str = Field(foreign_key="models.id", index=True, max_length=36)
    version_id: str = Field(foreign_key="model_versions.id", max_length=36)
    selector: str = Field(default="", max_length=500)
    plan: dict[str, Any] = json_field()  # RolloutPlan as JSON: stages, gates, promotion
    state: str = Field(default=RolloutState.running, max_length=24, index=True)
    stage_index: int = 0
    stage_started_at: datetime | None = ts_field()
    reason: str = Field(default="", max_length=2000)
    created_by: str = Field(default="", max_length=160)
    created_at: datetime = created_at_field(index=True)
    updated_at: datetime | None = ts_field()
    finished_at: datetime | None = ts_field()


class RolloutDevice(SQLModel, table=True):
    __tablename__ = "rollout_devices"

    # No foreign keys: checking them locks a parent row per member inserted (ADR 0001).
    rollout_id: str = Field(primary_key=True, max_length=36)
    device_id: str = Field(primary_key=True, max_length=36)
    stage_index: int = Field(default=-1)  # -1: in the target set, not yet assigned
    order_key: str = Field(max_length=64)  # stable pseudo-random order: who is canary
    status: str = Field(default="waiting", max_length=24)  # waiting|assigned|active|failed|incompatible|rolled_back
    artifact_sha256: str | None = Field(default=None, max_length=64)
    reason: str = Field(default="", max_length=500)
    previous_desired: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    assigned_at: datetime | None = ts_field()


class GateEvaluation(SQLModel, table=True):
    __tablename__ = "gate_evaluations"

    id: str = id_field()
    rollout_id: str = Field(foreign_key="rollouts.id", index=True, max_length=36)
    stage_index: int
    result: str = Field(max_length=16)  # pass|fail|inconclusive
    details: dict[str, Any] = json_field()  # every gate with the numbers that decided it
    created_at: datetime = created_at_field(index=True)


class DesiredStateRow(SQLModel, table=True):
    __tablename__ = "desired_states"

    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=36)
    message_id: str = Field(max_length=36)
    model: str = Field(max_length=128)
    # Not indexed: nothing filters on it, and an index would keep every assignment (the version
    # changes) from updating the row in place (ADR 0007).
    version: str = Field(max_length=64)
    artifact_sha256: str = Field(max_length=64)
    rollout_id: str | None = Field(default=None, max_length=36)
    payload: dict[str, Any] = json_field()  # shared.desired.DesiredState as JSON
    # The payload's `unload`: serve nothing (version and artifact name what was withdrawn).
    unload: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false(), "nullable": False})
    published_message_id: str | None = Field(default=None, max_length=36)
    updated_at: datetime = created_at_field()
