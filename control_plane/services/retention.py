"""Deleting versions and collecting blobs: what is in use stays, what nothing references goes.

A stored blob's reference count is the number of artifact rows that name its sha256 with a
storage key; a blob whose count is zero is garbage. A version is in use while a device runs it,
a device is meant to run it (its desired state), or an active rollout targets it or keeps it as
its baseline. Garbage collection first applies each model's retention policy (keep the newest
`keep_versions` versions, never one in use), then removes the unreferenced blobs older than a
grace period (an upload adopts its blob a moment before its artifact row commits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session, col, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import (
    ACTIVE_STATES,
    Artifact,
    DesiredStateRow,
    Device,
    Model,
    ModelVersion,
    Rollout,
    VersionStatus,
)
from control_plane.storage import BlobStore

NAMED_AT_MOST = 20  # devices named in a refusal; the count says how many in all


@dataclass
class GcPlan:
    versions: list[tuple[Model, ModelVersion]] = field(default_factory=list)
    blobs: list[tuple[str, int]] = field(default_factory=list)  # (sha256, size in bytes)

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.blobs)


def on_version(model_name: str, version: str) -> sa.ColumnElement[bool]:
    """Devices (the `devices` table) that run model@version or are meant to (their desired state)."""
    desired = DesiredStateRow.__table__  # type: ignore[attr-defined]
    devices = Device.__table__  # type: ignore[attr-defined]
    meant = sa.select(desired.c.device_id).where(
        desired.c.model == model_name, desired.c.version == version, desired.c.unload.is_(False)
    )
    running = sa.and_(devices.c.current_model == model_name, devices.c.current_version == version)
    return sa.or_(running, devices.c.id.in_(meant))


def version_users(session: Session, model: Model, version: str) -> tuple[list[str], list[str]]:
    """(names of the devices that run or are meant to run model@version, ids of active rollouts on it)."""
    devices = Device.__table__  # type: ignore[attr-defined]
    stmt = sa.select(devices.c.name).where(on_version(model.name, version)).order_by(devices.c.name)
    names = session.execute(stmt).scalars()
    rollouts = [
        r.id
        for r in session.exec(
            select(Rollout).where(Rollout.model_id == model.id, col(Rollout.state).in_(ACTIVE_STATES))
        )
        if r.plan.get("version") == version or r.plan.get("baseline_version") == version
    ]
    return list(names), rollouts


def delete_version(session: Session, model: Model, row: ModelVersion) -> list[str]:
    """Remove a version's artifacts and mark it deleted (409 `version_in_use`, naming the devices,
    while it is in use). Returns the sha256 of the blobs it referenced."""
    if row.status == VersionStatus.deleted:
        raise DomainError(ErrorCode.VERSION_NOT_FOUND, f"{model.name}@{row.version} was deleted")
    devices, rollouts = version_users(session, model, row.version)
    if devices or rollouts:
        raise DomainError(
            ErrorCode.VERSION_IN_USE,
            f"{model.name}@{row.version} is in use by {_named(devices)} and {len(rollouts)} active rollout(s)",
            devices=devices[:NAMED_AT_MOST],
            device_count=len(devices),
            rollouts=rollouts,
        )
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == row.id)).all()
    for artifact in artifacts:
        session.delete(artifact)
    row.status = VersionStatus.deleted
    session.add(row)
    session.flush()
    return [a.sha256 for a in artifacts if a.storage_key]


def _named(devices: list[str], shown: int = 5) -> str:
    if not devices:
        return "no device"
    more = f" and {len(devices) - shown} more" if len(devices) > shown else ""
    return "device(s) " + ", ".join(devices[:shown]) + more


def referenced_blobs(session: Session) -> set[str]:
    stmt = select(Artifact.sha256).where(col(Artifact.storage_key).is_not(None)).distinct()
    return set(session.exec(stmt).all())


def _beyond_retention(session: Session) -> list[tuple[Model, ModelVersion]]:
    """Versions past their model's `keep_versions` newest that nothing uses."""
    out: list[tuple[Model, ModelVersion]] = []
    for model in session.exec(select(Model).where(col(Model.keep_versions).is_not(None))):
        rows = session.exec(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id, ModelVersion.status != VersionStatus.deleted)
            .order_by(col(ModelVersion.created_at).desc(), col(ModelVersion.id).desc())
        ).all()
        for row in rows[model.keep_versions or 0 :]:
            devices, rollouts = version_users(session, model, row.version)
            if not devices and not rollouts:
                out.append((model, row))
    return out


def plan_gc(session: Session, store: BlobStore, *, grace_s: float) -> GcPlan:
    """What a collection would remove now: versions beyond retention, then unreferenced blobs."""
    plan = GcPlan(versions=_beyond_retention(session))
    going = {row.id for _, row in plan.versions}
    kept = set(
        session.exec(
            select(Artifact.sha256).where(
                col(Artifact.storage_key).is_not(None), col(Artifact.version_id).not_in(going or {""})
            )
        ).all()
    )
    cutoff = time.time() - grace_s
    for blob in store.list_blobs():
        if blob.sha256 not in kept and blob.modified <= cutoff:
            plan.blobs.append((blob.sha256, blob.size_bytes))
    return plan


def remove_unreferenced(session: Session, store: BlobStore, candidates: list[str], *, grace_s: float) -> int:
    """Delete the candidate blobs no artifact references (checked again now); returns bytes freed."""
    referenced = referenced_blobs(session)
    cutoff = time.time() - grace_s
    freed = 0
    for sha256 in dict.fromkeys(candidates):
        blob = None if sha256 in referenced else store.stat(sha256)
        if blob is None or blob.modified > cutoff:
            continue
        store.delete(sha256)
        freed += blob.size_bytes
    return freed
