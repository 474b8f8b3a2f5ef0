"""Background jobs run by the control plane (quantization), with their progress and outcome."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field, ts_field


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: str = id_field()
    kind: str = Field(max_length=32)
    state: str = Field(default="queued", max_length=16, index=True)  # queued, running, succeeded, failed
    progress: float = Field(default=0.0)
    step: str = Field(default="queued", max_length=64)
    target: str = Field(default="", max_length=300)
    params: dict[str, Any] = json_field()
    result: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    error: str | None = Field(default=None, max_length=4000)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = created_at_field(index=True)
    finished_at: datetime | None = ts_field()
