"""Base class for every wire message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from shared import SCHEMA_VERSION


class WireModel(BaseModel):
    """A frozen message; unknown fields are ignored so older peers can read newer messages."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA_VERSION
