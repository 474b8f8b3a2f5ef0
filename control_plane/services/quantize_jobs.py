"""Quantization as a control-plane background job: a stored artifact in, a new version out.

Jobs are rows in `jobs` (state, progress, result), so their status survives the process that ran
them; one worker thread per control plane runs them one at a time. A job a restart interrupted is
marked failed when the next runner starts. Requests are checked before a job is queued, so a type
a model's shapes cannot take is a 422 from the POST, not a failed job.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Artifact, Job, ModelVersion, utcnow
from control_plane.schemas import VERSION_PATTERN, ArtifactSpec, UTCDatetime, VersionSpec
from control_plane.services import audit, registry
from control_plane.services.sniff import sniff_artifact
from control_plane.storage import LocalBlobStore

log = logging.getLogger("slmops.jobs")
QUANTIZABLE = ("gguf", "onnx")


class QuantizeRequest(BaseModel):
    to: str = Field(min_length=1, max_length=32, description="GGUF: Q8_0, Q4_0, Q4_K_M, ...; ONNX: int8, int8-static")
    version: str | None = Field(default=None, pattern=VERSION_PATTERN, description="default: <version>-<to>")
    artifact_sha256: str | None = Field(default=None, description="source artifact; default: the float one")


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    kind: str
    state: str  # queued, running, succeeded, failed
    progress: float
    step: str
    target: str
    params: dict[str, Any]
    created_by: str
    created_at: UTCDatetime
    finished_at: UTCDatetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


def _pick_source(session: Session, version: ModelVersion, sha256: str | None) -> Artifact:
    artifacts = list(session.exec(select(Artifact).where(Artifact.version_id == version.id)))
    if sha256:
        artifacts = [a for a in artifacts if a.sha256 == sha256]
    candidates = [a for a in artifacts if a.format in QUANTIZABLE and a.storage_key]
    if not candidates:
        raise DomainError(
            ErrorCode.QUANTIZATION_UNSUPPORTED,
            "the version has no stored GGUF or ONNX artifact to quantize (referenced artifacts are not fetched)",
        )
    # The float artifact is the best source; quantizing an already quantized one compounds the error.
    return max(candidates, key=_is_float)


def _is_float(artifact: Artifact) -> bool:
    return (artifact.quantization or "").upper() in ("", "F32", "FP32", "ALL_F32", "F16", "BF16")


def _check_target(source: Artifact, path: Path, to: str) -> str:
    from control_plane.modelopt import QuantizeError, check_gguf_quantizable

    if source.format == "onnx":
        if to.lower() not in ("int8", "int8-static"):
            raise DomainError(
                ErrorCode.QUANTIZATION_UNSUPPORTED, f"ONNX models quantize to int8 or int8-static only, not {to!r}"
            )
        return to.lower()
    try:
        if _dequantizes(path, to.upper()):
            return to.upper()  # its exactness is proved by the job, value by value
        check_gguf_quantizable(path, to.upper())
    except QuantizeError as exc:
        raise DomainError(ErrorCode.QUANTIZATION_UNSUPPORTED, str(exc), to=to, source_sha256=source.sha256) from exc
    return to.upper()


def _dequantizes(path: Path, to: str) -> bool:
    """Whether quantizing `path` to `to` is an upcast of a quantized GGUF (lineage `dequantized_from`)."""
    from control_plane.modelopt.quantize import DEQUANTIZE_TYPES, is_quantized_gguf

    return to in DEQUANTIZE_TYPES and is_quantized_gguf(path)


class QuantizeJobs:
    """Runs queued quantize jobs on one worker thread; their state lives in the `jobs` table."""

    def __init__(self, engine: sa.Engine, store: LocalBlobStore) -> None:
        self._engine = engine
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantize-job")
        self._fail_interrupted()

    def _fail_interrupted(self) -> None:
        with Session(self._engine) as session:
            for job in session.exec(select(Job).where(col(Job.state).in_(("queued", "running")))):
                job.state, job.step, job.finished_at = "failed", "failed", utcnow()
                job.error = "interrupted: the control plane restarted before the job finished"
                session.add(job)
            session.commit()

    @staticmethod
    def get(session: Session, job_id: str) -> JobPublic:
        job = session.get(Job, job_id)
        if job is None:
            raise DomainError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id}")
        return JobPublic.model_validate(job)

    def prepare(self, session: Session, *, model: str, version: str, request: QuantizeRequest, actor: str) -> Job:
        """Check the request and add its job row (the caller commits, then calls `start`)."""
        model_row, version_row = registry.get_version(session, model, version)
        source = _pick_source(session, version_row, request.artifact_sha256)
        to = _check_target(source, self._store.path_for(source.sha256), request.to)
        new_version = request.version or f"{version}-{to.lower()}"
        if session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model_row.id, ModelVersion.version == new_version)
        ).first():
            raise DomainError(ErrorCode.VERSION_EXISTS, f"model {model!r} already has version {new_version!r}")
        params = {"model": model, "version": version, "new_version": new_version, "to": to}
        if source.format == "gguf" and _dequantizes(self._store.path_for(source.sha256), to):
            params["relation"] = "dequantized_from"
        job = Job(
            kind="quantize",
            target=f"{model}@{version} -> {new_version} ({to})",
            params=params | {"source_sha256": source.sha256, "source_format": source.format},
            created_by=actor,
        )
        session.add(job)
        session.flush()
        return job

    def start(self, job_id: str) -> None:
        self._pool.submit(self._run, job_id)

    def _update(self, job_id: str, **changes: Any) -> None:
        with Session(self._engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            for key, value in changes.items():
                setattr(job, key, value)
            session.add(job)
            session.commit()

    def _run(self, job_id: str) -> None:
        try:
            with Session(self._engine) as session:
                job = session.get(Job, job_id)
                assert job is not None
                params, created_by = dict(job.params), job.created_by
            self._update(job_id, state="running", step="quantizing", progress=0.1)
            with tempfile.TemporaryDirectory(dir=self._store.root) as scratch:
                out = Path(scratch) / f"quantized.{params['source_format']}"
                size_before = self._quantize(params, out)
                self._update(job_id, step="registering", progress=0.7)
                result = self._register(job_id, params, created_by, out, size_before)
            self._update(job_id, state="succeeded", step="done", progress=1.0, result=result, finished_at=utcnow())
        except Exception as exc:  # a job reports every failure in its status instead of dying silently
            log.exception("quantize job %s failed", job_id)
            self._update(job_id, state="failed", step="failed", error=str(exc)[:4000], finished_at=utcnow())

    def _quantize(self, params: dict[str, Any], out: Path) -> int:
        from control_plane.modelopt import quantize_gguf, quantize_onnx_int8

        source = self._store.path_for(params["source_sha256"])
        if params["to"] == "int8-static":
            from control_plane.modelopt.onnx_static import quantize_onnx_int8_static

            return quantize_onnx_int8_static(source, out).size_before
        if params["source_format"] == "onnx":
            return quantize_onnx_int8(source, out).size_before
        return quantize_gguf(source, out, params["to"]).size_before

    def _register(
        self, job_id: str, params: dict[str, Any], created_by: str, out: Path, size_before: int
    ) -> dict[str, Any]:
        from shared.hashing import file_sha256

        size_after = out.stat().st_size
        sha256 = file_sha256(out)
        fmt, metadata = sniff_artifact(out)
        blob = self._store.adopt(out, sha256, size_after)
        reduction = round(1.0 - size_after / size_before, 4)
        metrics = {"size_reduction": reduction, "parent_size_bytes": size_before, "size_bytes": size_after}
        with Session(self._engine, expire_on_commit=False) as session:
            model, _ = registry.get_version(session, params["model"], params["version"])
            spec = VersionSpec(
                version=params["new_version"],
                parent=params["version"],
                relation=params.get("relation", "quantized_from"),
                eval_metrics=metrics,
                notes=f"{'dequantized' if params.get('relation') else 'quantized'} to {params['to']} by job {job_id}",
            )
            row = registry.create_version(session, model=model, spec=spec, created_by=created_by)
            artifact_spec = ArtifactSpec(quantization=params["to"])
            registry.add_stored_artifact(
                session, version=row, blob=blob, fmt=fmt, file_metadata=metadata, spec=artifact_spec
            )
            target = f"{params['model']}@{params['new_version']}"
            audit.record(
                session, actor=created_by, action="version.quantize", target=target, request_id=job_id, sha256=sha256
            )
            session.commit()
        return {"model": params["model"], "version": params["new_version"], "sha256": sha256, **metrics}
