"""Eval metrics measured elsewhere (`slmops model evaluate`) stored on a version and its artifact,
and the golden-prompt set a version is checked with on the devices during its trial."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlmodel import Session, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Artifact, ModelVersion
from shared.desired import GoldenSet


class EvalMetricsUpdate(BaseModel):
    metrics: dict[str, Any] = Field(description="merged into the stored metrics (keys given replace old ones)")
    artifact_sha256: str | None = Field(default=None, description="the artifact measured; default: version only")
    against: str | None = Field(default=None, max_length=200, description="what it was compared with")


def quality_retention(session: Session, version: ModelVersion, metric: str = "quality_retention") -> float | None:
    """The version's stored `metric`, else the lowest of its artifacts' (None: never measured)."""
    value = (version.eval_metrics or {}).get(metric)
    if isinstance(value, int | float):
        return float(value)
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == version.id))
    measured = [
        float(a.eval_metrics[metric]) for a in artifacts if isinstance((a.eval_metrics or {}).get(metric), int | float)
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
            raise DomainError(ErrorCode.ARTIFACT_NOT_FOUND, f"the version has no artifact {update.artifact_sha256}")
        # A new dict, so SQLAlchemy sees the JSON column change.
        artifact.eval_metrics = {**(artifact.eval_metrics or {}), **metrics}
        session.add(artifact)
    version.eval_metrics = {**(version.eval_metrics or {}), **metrics}
    session.add(version)


def store_golden_set(session: Session, *, version: ModelVersion, golden: GoldenSet) -> None:
    """Attach `golden` to the version: rollouts from now on deliver it with the desired state."""
    version.golden_set = golden.model_dump(mode="json", exclude={"schema_version"})
    session.add(version)


def golden_set(version: ModelVersion) -> GoldenSet:
    if not version.golden_set:
        raise DomainError(ErrorCode.GOLDEN_SET_NOT_FOUND, f"version {version.version} has no golden-prompt set")
    return GoldenSet.model_validate(version.golden_set)
