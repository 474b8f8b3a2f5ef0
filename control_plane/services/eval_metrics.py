"""Eval metrics measured elsewhere (`slmops model evaluate`) stored on a version and its artifact."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlmodel import Session, select

from control_plane.errors import DomainError
from control_plane.models import Artifact, ModelVersion


class EvalMetricsUpdate(BaseModel):
    metrics: dict[str, Any] = Field(description="merged into the stored metrics (keys given replace old ones)")
    artifact_sha256: str | None = Field(default=None, description="the artifact measured; default: version only")
    against: str | None = Field(default=None, max_length=200, description="what it was compared with")


def quality_retention(session: Session, version: ModelVersion) -> float | None:
    """The version's stored quality retention, else the lowest of its artifacts' (None: never measured)."""
    value = (version.eval_metrics or {}).get("quality_retention")
    if isinstance(value, int | float):
        return float(value)
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id))
    measured = [
        float(a.eval_metrics["quality_retention"])
        for a in artifacts
        if isinstance((a.eval_metrics or {}).get("quality_retention"), int | float)
    ]
    return min(measured) if measured else None


def store_eval_metrics(session: Session, *, version: ModelVersion, update: EvalMetricsUpdate) -> None:
    metrics = dict(update.metrics)
    if update.against:
        metrics["evaluated_against"] = update.against
    if update.artifact_sha256:
        artifact = session.exec(
            select(Artifact).where(Artifact.version_id == version.id, Artifact.sha256 == update.artifact_sha256)
        ).first()
        if artifact is None:
            raise DomainError("artifact_not_found", f"the version has no artifact {update.artifact_sha256}")
        # A new dict, so SQLAlchemy sees the JSON column change.
        artifact.eval_metrics = {**(artifact.eval_metrics or {}), **metrics}
        session.add(artifact)
    version.eval_metrics = {**(version.eval_metrics or {}), **metrics}
    session.add(version)
