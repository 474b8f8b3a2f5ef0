"""Desired-state assignment: the only writer of `desired_states` rows (the outbox)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import or_
from sqlmodel import Session, select

from control_plane.db import bulk
from control_plane.models import (
    Artifact,
    ArtifactFormat,
    DesiredStateRow,
    LineageRelation,
    Model,
    ModelVersion,
    utcnow,
)
from control_plane.trust import releases
from shared.desired import ArtifactRef, DesiredState, GoldenSet, RuntimeParams

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
    *,
    variants: Sequence[Artifact] = (),
) -> DesiredState:
    """The desired state for `artifact`, under the signed release of all the version's `variants`."""
    hints = artifact.runtime_hints or {}
    n_ctx = min(int(hints.get("context_length") or DEFAULT_N_CTX), 4096)
    signer = releases.current()
    release = None
    if signer is not None:
        release = signer.release_for(
            model=model.name,
            version=version.version,
            artifacts=variants or [artifact],
            adapter=adapter,
            rollout_id=rollout_id,
        )
    return DesiredState(
        message_id=str(uuid.uuid4()),
        model=model.name,
        version=version.version,
        artifact=_ref(artifact),
        adapter=_ref(adapter) if adapter is not None else None,
        runtime=RuntimeParams(n_ctx=n_ctx, chat_template=hints.get("chat_template")),
        rollout_id=rollout_id,
        golden=GoldenSet.model_validate(version.golden_set) if version.golden_set else None,
        release=release,
        roots=signer.rotations if signer is not None else [],
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


def with_message_id(template: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of a validated DesiredState (as JSON) under a fresh message id."""
    # 128 random bits as hex: as unique as a uuid4 string, without uuid.UUID's cost per device.
    return {**template, **changes, "message_id": secrets.token_hex(16)}


def write_desired(session: Session, states: dict[str, dict[str, Any]]) -> None:
    """Replace the desired state of every device in `states` (device id -> DesiredState as JSON).

    The publisher sends them (retained) after commit. One set-based upsert (control_plane.db.bulk),
    no SQLModel row per device (ADR 0006). The payloads come from a DesiredState validated once
    per artifact (`desired_payload`), so no check is skipped.
    ORM copies of these rows in `session` are expired, so later reads see the new state.
    """
    if not states:
        return
    table = DesiredStateRow.__table__  # type: ignore[attr-defined]
    now = utcnow()
    rows = [
        {
            "device_id": device_id,
            "message_id": payload["message_id"],
            "model": payload["model"],
            "version": payload["version"],
            "artifact_sha256": payload["artifact"]["sha256"],
            "rollout_id": payload.get("rollout_id"),
            "payload": payload,
            "unload": bool(payload.get("unload", False)),
            "published_message_id": None,
            "updated_at": now,
        }
        for device_id, payload in states.items()
    ]
    bulk.upsert(session, table, rows, key=["device_id"])
    # The session rarely holds any of these rows: walk what it holds, not every device's key.
    for cached in list(session.identity_map.values()):
        if isinstance(cached, DesiredStateRow) and cached.device_id in states:
            session.expire(cached)


def unload_desired(current: dict[str, Any]) -> dict[str, Any]:
    """The desired state that withdraws `current` (a DesiredState as JSON): serve nothing. For a
    rollback of a device that had no desired state before the rollout."""
    return with_message_id(_resigned(current, unload=True), rollout_id=None, unload=True)


def restore_desired(previous: dict[str, Any]) -> dict[str, Any]:
    """A previous desired state sent again, under a fresh message id and outside any rollout; its
    release is signed anew (a higher serial), or devices would refuse it as a rollback."""
    return with_message_id(_resigned(previous, unload=False), rollout_id=None)


def _resigned(payload: dict[str, Any], *, unload: bool) -> dict[str, Any]:
    state = DesiredState.model_validate(payload)
    if (signer := releases.current()) is not None:
        state = signer.resign(state, rollout_id=None, unload=unload)
    return state.model_dump(mode="json")


def pending_publication(
    session: Session, limit: int = 5000, *, after: str | None = None, excluding: Sequence[str] = ()
) -> list[tuple[str, str, str]]:
    """(device id, message id, payload as JSON text) of desired states the broker has not
    acknowledged yet, in device-id order, from the first device id above `after`, but for the
    message ids in `excluding` (states the publisher holds already).

    The payload is read as the column's text (PostgreSQL's `json` keeps what was written): it goes
    on the wire as it is, without a decode and a re-encode per device."""
    table = DesiredStateRow.__table__  # type: ignore[attr-defined]
    unpublished = or_(table.c.published_message_id.is_(None), table.c.published_message_id != table.c.message_id)
    payload = sa.cast(table.c.payload, sa.Text)
    stmt = select(table.c.device_id, table.c.message_id, payload).where(unpublished)
    for clause in bulk.matching(session, table.c.message_id, excluding):
        stmt = stmt.where(sa.not_(clause))
    if after is not None:
        stmt = stmt.where(table.c.device_id > after)
    return [(d, m, p) for d, m, p in session.execute(stmt.order_by(table.c.device_id).limit(limit)).all()]


def mark_published(session: Session, published: list[tuple[str, str]]) -> None:
    """Record (device id, message id) pairs as acknowledged by the broker: one statement per batch,
    matched on the primary key; a row replaced meanwhile has a new message id and stays pending."""
    table = DesiredStateRow.__table__  # type: ignore[attr-defined]
    rows = [{"device_id": d, "message_id": m, "published_message_id": m} for d, m in published]
    bulk.update(session, table, rows, key=("device_id", "message_id"))
