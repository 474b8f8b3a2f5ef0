"""Desired-state assignment: the only writer of `desired_states` rows (the outbox)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from control_plane.models import (
    Artifact,
    ArtifactFormat,
    DesiredStateRow,
    Device,
    LineageRelation,
    Model,
    ModelVersion,
    utcnow,
)
from shared.desired import ArtifactRef, DesiredState, RuntimeParams

DEFAULT_N_CTX = 512


def _ref(artifact: Artifact) -> ArtifactRef:
    return ArtifactRef(
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        format=artifact.format,  # type: ignore[arg-type]
        quantization=artifact.quantization,
        url=artifact.external_url or f"/v1/artifacts/{artifact.sha256}",
    )


def desired_payload(
    model: Model,
    version: ModelVersion,
    artifact: Artifact,
    rollout_id: str | None,
    adapter: Artifact | None = None,
) -> DesiredState:
    hints = artifact.runtime_hints or {}
    n_ctx = min(int(hints.get("context_length") or DEFAULT_N_CTX), 4096)
    return DesiredState(
        message_id=str(uuid.uuid4()),
        model=model.name,
        version=version.version,
        artifact=_ref(artifact),
        adapter=_ref(adapter) if adapter is not None else None,
        runtime=RuntimeParams(n_ctx=n_ctx, chat_template=hints.get("chat_template")),
        rollout_id=rollout_id,
    )


def deployable_artifacts(session: Session, version: ModelVersion) -> tuple[list[Artifact], Artifact | None]:
    """The artifacts devices choose from, and the LoRA adapter applied on top (adapter versions only).

    An `adapter_of` version ships its GGUF LoRA file with its base version's artifacts: a device that
    already holds the base downloads only the adapter, since agents fetch only what their store lacks.
    """
    own = list(session.exec(select(Artifact).where(Artifact.version_id == version.id)))
    if version.lineage_relation != LineageRelation.adapter_of or version.parent_version_id is None:
        return own, None
    adapter = next((a for a in own if a.format == ArtifactFormat.gguf_lora), None)
    if adapter is None:  # an "adapter" pushed as a merged model deploys as itself
        return own, None
    base = session.exec(select(Artifact).where(Artifact.version_id == version.parent_version_id))
    return [a for a in base if a.format == ArtifactFormat.gguf], adapter


def current_desired(session: Session, device_id: str) -> DesiredStateRow | None:
    return session.get(DesiredStateRow, device_id)


_UNKNOWN = object()


def set_desired(
    session: Session, device: Device, state: DesiredState, current: DesiredStateRow | None | object = _UNKNOWN
) -> DesiredStateRow:
    """Replace the device's desired state; the publisher sends it (retained) after commit.

    `current` is the device's existing row when the caller already loaded it (None: it has none).
    """
    row = session.get(DesiredStateRow, device.id) if current is _UNKNOWN else current
    assert row is None or isinstance(row, DesiredStateRow)
    if row is None:
        # Every field at construction: SQLModel's per-attribute __setattr__ made setting them again
        # below the largest cost of a 10,000-device assignment (cProfile).
        row = DesiredStateRow(
            device_id=device.id,
            message_id=state.message_id,
            model=state.model,
            version=state.version,
            artifact_sha256=state.artifact.sha256,
            rollout_id=state.rollout_id,
            payload=state.model_dump(mode="json"),
            updated_at=utcnow(),
        )
        session.add(row)
        return row
    row.message_id = state.message_id
    row.model = state.model
    row.version = state.version
    row.artifact_sha256 = state.artifact.sha256
    row.rollout_id = state.rollout_id
    row.payload = state.model_dump(mode="json")
    row.updated_at = utcnow()
    session.add(row)
    return row


def restore_desired(session: Session, device: Device, previous: dict[str, Any]) -> DesiredStateRow:
    """Send a device back to a previous desired state, under a fresh message id."""
    state = DesiredState.model_validate({**previous, "message_id": str(uuid.uuid4()), "rollout_id": None})
    return set_desired(session, device, state)


def pending_publication(session: Session, limit: int = 5000) -> list[DesiredStateRow]:
    unpublished = or_(
        col(DesiredStateRow.published_message_id).is_(None),
        col(DesiredStateRow.published_message_id) != col(DesiredStateRow.message_id),
    )
    return list(session.exec(select(DesiredStateRow).where(unpublished).limit(limit)).all())


def mark_published(session: Session, message_ids: list[str]) -> None:
    """One statement for the batch; a row replaced meanwhile has a new message id and stays pending."""
    for start in range(0, len(message_ids), 500):
        chunk = message_ids[start : start + 500]
        session.execute(
            update(DesiredStateRow)
            .where(col(DesiredStateRow.message_id).in_(chunk))
            .values(published_message_id=DesiredStateRow.message_id)
            # Not "evaluate": matching the IN list against every loaded row, per chunk, took 1.3 s
            # for 5,000 rows (cProfile); the publisher's session ends right after this.
            .execution_options(synchronize_session=False)
        )
