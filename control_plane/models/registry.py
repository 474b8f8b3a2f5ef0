"""Model registry tables: Model -> ModelVersion (lineage) -> Artifact (hardware variants)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from control_plane.models.base import created_at_field, id_field, json_field


class VersionStatus(StrEnum):
    registered = "registered"
    validated = "validated"
    deprecated = "deprecated"  # no new rollout may target it
    revoked = "revoked"
    recalled = "recalled"  # every device was rolled off it; no rollout may target it again
    deleted = "deleted"  # its artifacts are gone; the row stays for rollout history and lineage


# Statuses a rollout, a recall or a late enrollment may still give devices.
DEPLOYABLE_STATUSES = (VersionStatus.registered, VersionStatus.validated)


class LineageRelation(StrEnum):
    quantized_from = "quantized_from"
    distilled_from = "distilled_from"
    finetuned_from = "finetuned_from"
    adapter_of = "adapter_of"


class ArtifactFormat(StrEnum):
    gguf = "gguf"
    onnx = "onnx"
    onnx_tar = "onnx-tar"  # an ONNX model folder with external data, packed as one tar
    gguf_lora = "gguf-lora"


class Model(SQLModel, table=True):
    __tablename__ = "models"

    id: str = id_field()
    name: str = Field(max_length=128, unique=True, index=True)
    description: str = Field(default="", max_length=2000)
    task: str = Field(default="text-generation", max_length=64)
    keep_versions: int | None = Field(default=None, ge=1)  # retention: newest N versions; None: all
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = created_at_field()


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: str = id_field()
    model_id: str = Field(foreign_key="models.id", index=True, max_length=36)
    version: str = Field(max_length=64)
    status: str = Field(default=VersionStatus.registered, max_length=16)
    created_by: str = Field(default="", max_length=128)
    notes: str = Field(default="", max_length=4000)
    eval_metrics: dict[str, Any] = json_field()
    parent_version_id: str | None = Field(default=None, foreign_key="model_versions.id", max_length=36)
    lineage_relation: str | None = Field(default=None, max_length=32)
    provenance: dict[str, Any] = json_field()  # teacher, dataset, method: recorded, not verified
    created_at: datetime = created_at_field(index=True)


class Artifact(SQLModel, table=True):
    """One file of a version. Several artifacts of one version are variants for different hardware."""

    __tablename__ = "artifacts"
    __table_args__ = (sa.UniqueConstraint("version_id", "sha256", name="uq_artifacts_version_sha256"),)

    id: str = id_field()
    version_id: str = Field(foreign_key="model_versions.id", index=True, max_length=36)
    format: str = Field(max_length=16)
    quantization: str | None = Field(default=None, max_length=32)
    size_bytes: int = Field(sa_type=sa.BigInteger)  # type: ignore[call-overload]
    sha256: str = Field(max_length=64, index=True)
    storage_key: str | None = Field(default=None, max_length=200)  # blobs/sha256/<hex> when stored here
    external_url: str | None = Field(default=None, max_length=2000)  # https:// or s3:// when by reference
    runtime_hints: dict[str, Any] = json_field()  # context_length, chat_template, ...
    min_ram_mb: int = Field(default=0, ge=0)
    accelerators: list[str] = json_field(list)  # required accelerators; empty: runs on CPU
    cpu_arch: list[str] = json_field(list)  # allowed architectures; empty: any
    file_metadata: dict[str, Any] = json_field()  # what sniffing the file found (gguf/onnx header)
    eval_metrics: dict[str, Any] = json_field()
    created_at: datetime = created_at_field()
