"""Model registry: models, versions with lineage, artifacts stored here or by reference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Artifact, LineageRelation, Model, ModelVersion
from control_plane.schemas import (
    ArtifactPublic,
    ArtifactReference,
    ArtifactSpec,
    LineagePublic,
    ModelCreate,
    VersionPublic,
    VersionSpec,
)
from control_plane.storage import StoredBlob
from shared.references import reference_problem, shown_reference


def create_model(session: Session, *, spec: ModelCreate, created_by: str) -> Model:
    if session.exec(select(Model).where(Model.name == spec.name)).first() is not None:
        raise DomainError(ErrorCode.MODEL_EXISTS, f"model {spec.name!r} already exists")
    model = Model(
        name=spec.name,
        description=spec.description,
        task=spec.task,
        keep_versions=spec.keep_versions,
        created_by=created_by,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise DomainError(ErrorCode.MODEL_NOT_FOUND, f"no model named {name!r}")
    return model


def get_version(session: Session, model_name: str, version: str) -> tuple[Model, ModelVersion]:
    model = get_model(session, model_name)
    row = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
    ).first()
    if row is None:
        raise DomainError(ErrorCode.VERSION_NOT_FOUND, f"model {model_name!r} has no version {version!r}")
    return model, row


def _resolve_parent(session: Session, model: Model, parent: str | None) -> ModelVersion | None:
    if not parent:
        return None
    model_name, _, version = parent.rpartition("@")
    _, parent_row = get_version(session, model_name or model.name, version)
    return parent_row


def create_version(session: Session, *, model: Model, spec: VersionSpec, created_by: str) -> ModelVersion:
    existing = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == spec.version)
    ).first()
    if existing is not None:
        raise DomainError(ErrorCode.VERSION_EXISTS, f"model {model.name!r} already has version {spec.version!r}")
    parent = _resolve_parent(session, model, spec.parent)
    if (parent is None) != (spec.relation is None):
        raise DomainError(ErrorCode.VALIDATION_ERROR, "parent and relation must be given together")
    row = ModelVersion(
        model_id=model.id,
        version=spec.version,
        created_by=created_by,
        notes=spec.notes,
        eval_metrics=spec.eval_metrics,
        provenance=spec.provenance,
        parent_version_id=parent.id if parent else None,
        lineage_relation=LineageRelation(spec.relation).value if spec.relation else None,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:  # lost a race with a concurrent upload of the same version
        raise DomainError(
            ErrorCode.VERSION_EXISTS, f"model {model.name!r} already has version {spec.version!r}"
        ) from exc
    return row


def add_stored_artifact(
    session: Session,
    *,
    version: ModelVersion,
    blob: StoredBlob,
    fmt: str,
    file_metadata: dict[str, Any],
    spec: ArtifactSpec,
) -> Artifact:
    hints = {k: v for k, v in file_metadata.items() if k in ("context_length", "chat_template") and v}
    hints.update(spec.runtime_hints)
    artifact = Artifact(
        version_id=version.id,
        format=fmt,
        quantization=spec.quantization or file_metadata.get("quantization") or _default_quant(fmt),
        size_bytes=blob.size_bytes,
        sha256=blob.sha256,
        storage_key=blob.storage_key,
        runtime_hints=hints,
        min_ram_mb=spec.min_ram_mb,
        accelerators=spec.accelerators,
        cpu_arch=spec.cpu_arch,
        file_metadata=file_metadata,
    )
    return _insert_artifact(session, artifact)


def check_reference(url: str, allowed_hosts: Sequence[str] = ()) -> None:
    """Refuse a reference devices must not be sent to (see shared/references.py for the rules)."""
    if (problem := reference_problem(url, allowed_hosts=allowed_hosts)) is not None:
        raise DomainError(ErrorCode.INVALID_REFERENCE, f"artifact reference refused: {problem}")


def add_referenced_artifact(
    session: Session, *, version: ModelVersion, ref: ArtifactReference, allowed_hosts: Sequence[str] = ()
) -> Artifact:
    check_reference(ref.url, allowed_hosts)
    artifact = Artifact(
        version_id=version.id,
        format=ref.format,
        quantization=ref.quantization,
        size_bytes=ref.size_bytes,
        sha256=ref.sha256,
        external_url=ref.url,
        runtime_hints=ref.runtime_hints,
        min_ram_mb=ref.min_ram_mb,
        accelerators=ref.accelerators,
        cpu_arch=ref.cpu_arch,
    )
    return _insert_artifact(session, artifact)


def _insert_artifact(session: Session, artifact: Artifact) -> Artifact:
    duplicate = session.exec(
        select(Artifact).where(Artifact.version_id == artifact.version_id, Artifact.sha256 == artifact.sha256)
    ).first()
    if duplicate is not None:
        raise DomainError(ErrorCode.VERSION_EXISTS, "this version already holds an artifact with that sha256")
    session.add(artifact)
    session.flush()
    return artifact


def _default_quant(fmt: str) -> str | None:
    return "fp32" if fmt in ("onnx", "onnx-tar") else None


def find_artifact(session: Session, sha256: str) -> Artifact:
    artifact = session.exec(select(Artifact).where(Artifact.sha256 == sha256)).first()
    if artifact is None:
        raise DomainError(ErrorCode.ARTIFACT_NOT_FOUND, f"no artifact with sha256 {sha256}")
    return artifact


def artifact_public(artifact: Artifact, deduplicated: bool | None = None) -> ArtifactPublic:
    external = shown_reference(artifact.external_url) if artifact.external_url else None
    # A reference with secrets redacted is reached through the download route, which redirects to it whole.
    url = external if external and external == artifact.external_url else f"/v1/artifacts/{artifact.sha256}"
    return ArtifactPublic.model_validate(
        {**artifact.model_dump(), "external_url": external, "download_url": url, "deduplicated": deduplicated}
    )


def version_public(session: Session, model: Model, row: ModelVersion) -> VersionPublic:
    artifacts = session.exec(
        select(Artifact).where(Artifact.version_id == row.id).order_by(Artifact.created_at, Artifact.id)  # type: ignore[arg-type]
    ).all()
    parent = None
    if row.parent_version_id:
        parent_row = session.get(ModelVersion, row.parent_version_id)
        if parent_row is not None:
            parent_model = session.get(Model, parent_row.model_id)
            parent = LineagePublic(
                model=parent_model.name if parent_model else "?",
                version=parent_row.version,
                relation=row.lineage_relation,
            )
    return VersionPublic(
        id=row.id,
        model=model.name,
        version=row.version,
        status=row.status,
        created_by=row.created_by,
        notes=row.notes,
        eval_metrics=row.eval_metrics,
        provenance=row.provenance,
        parent=parent,
        artifacts=[artifact_public(a) for a in artifacts],
        created_at=row.created_at,
    )
