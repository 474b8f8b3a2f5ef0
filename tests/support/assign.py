"""Assign a version to a device as the rollout controller does, for tests that drive agents by hand.

A device downloads only the artifacts of versions assigned to it, so a test that hands an agent a
desired state directly assigns that version first.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from control_plane.models import Artifact, Model, ModelVersion
from control_plane.rollouts import assign


def assign_version(
    engine: sa.Engine,
    device_id: str,
    *,
    model: str,
    version: str,
    rollout_id: str | None = None,
    adapter_sha256: str | None = None,
) -> dict[str, Any]:
    """Write the device's desired state for `model@version` (its first artifact); returns the payload."""
    with Session(engine) as session:
        owner = session.exec(select(Model).where(Model.name == model)).one()
        row = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == owner.id, ModelVersion.version == version)
        ).one()
        artifact = session.exec(select(Artifact).where(Artifact.version_id == row.id)).first()
        assert artifact is not None, f"{model}@{version} has no artifact"
        adapter = None
        if adapter_sha256:
            adapter = session.exec(select(Artifact).where(Artifact.sha256 == adapter_sha256)).first()
        payload = assign.desired_payload(owner, row, artifact, rollout_id, adapter=adapter).model_dump(mode="json")
        assign.write_desired(session, {device_id: payload})
        session.commit()
    return payload
