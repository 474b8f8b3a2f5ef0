"""Quantization as a control-plane background job: a stored artifact in, a new version out.

Jobs live in memory (one worker thread per control plane, one job at a time): a restart forgets
them, and the version a finished job registered stays. Requests are checked before a job is queued,
so a type a model's shapes cannot take is a 422 from the POST, not a failed job.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from control_plane.errors import DomainError
from control_plane.models import Artifact, ModelVersion, utcnow
from control_plane.schemas import VERSION_PATTERN, ArtifactSpec, VersionSpec
from control_plane.services import audit, registry
from control_plane.services.sniff import sniff_artifact
from control_plane.storage import LocalBlobStore

log = logging.getLogger("slmops.jobs")
QUANTIZABLE = ("gguf", "onnx")


class QuantizeRequest(BaseModel):
    to: str = Field(min_length=1, max_length=32, description="GGUF: Q8_0, Q4_0, Q4_K_M, ...; ONNX: int8")
    version: str | None = Field(default=None, pattern=VERSION_PATTERN, description="default: <version>-<to>")
    artifact_sha256: str | None = Field(default=None, description="source artifact; default: the float one")


class JobPublic(BaseModel):
    id: str
    kind: str
    state: str  # queued, running, succeeded, failed
    progress: float
    step: str
    target: str
    created_by: str
    created_at: datetime
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class QuantizeJob:
    """What a job needs to run, and (in `public`) what callers see of it."""

    public: JobPublic
    model: str
    version: str
    new_version: str
    to: str
    source: Artifact
    source_path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, **changes: Any) -> None:
        with self.lock:
            self.public = self.public.model_copy(update=changes)


def _pick_source(session: Session, version: ModelVersion, sha256: str | None) -> Artifact:
    artifacts = list(session.exec(select(Artifact).where(Artifact.version_id == version.id)))
    if sha256:
        artifacts = [a for a in artifacts if a.sha256 == sha256]
    candidates = [a for a in artifacts if a.format in QUANTIZABLE and a.storage_key]
    if not candidates:
        raise DomainError(
            "quantization_unsupported",
            "the version has no stored GGUF or ONNX artifact to quantize (referenced artifacts are not fetched)",
        )
    # The float artifact is the best source; quantizing an already quantized one compounds the error.
    return max(candidates, key=lambda a: (a.quantization or "").upper() in ("", "F32", "FP32", "ALL_F32", "F16"))


def _check_target(source: Artifact, path: Path, to: str) -> str:
    from slmops.modelopt import QuantizeError, check_gguf_quantizable

    if source.format == "onnx":
        if to.lower() != "int8":
            raise DomainError("quantization_unsupported", f"ONNX models quantize to int8 only, not {to!r}")
        return "int8"
    try:
        check_gguf_quantizable(path, to.upper())
    except QuantizeError as exc:
        raise DomainError("quantization_unsupported", str(exc), to=to, source_sha256=source.sha256) from exc
    return to.upper()


class QuantizeJobs:
    """The control plane's job table (in memory) and its single worker thread."""

    def __init__(self, engine: sa.Engine, store: LocalBlobStore) -> None:
        self._engine = engine
        self._store = store
        self._jobs: dict[str, QuantizeJob] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantize-job")

    def get(self, job_id: str) -> JobPublic:
        job = self._jobs.get(job_id)
        if job is None:
            raise DomainError("job_not_found", f"no job {job_id}")
        return job.public

    def submit(self, session: Session, *, model: str, version: str, request: QuantizeRequest, actor: str) -> JobPublic:
        """Check the request, then queue the job; refusals raise DomainError before anything runs."""
        model_row, version_row = registry.get_version(session, model, version)
        source = _pick_source(session, version_row, request.artifact_sha256)
        source_path = self._store.path_for(source.sha256)
        to = _check_target(source, source_path, request.to)
        new_version = request.version or f"{version}-{to.lower()}"
        if session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model_row.id, ModelVersion.version == new_version)
        ).first():
            raise DomainError("version_exists", f"model {model!r} already has version {new_version!r}")
        public = JobPublic(
            id=str(uuid.uuid4()),
            kind="quantize",
            state="queued",
            progress=0.0,
            step="queued",
            target=f"{model}@{version} -> {new_version} ({to})",
            created_by=actor,
            created_at=utcnow(),
        )
        job = QuantizeJob(public, model, version, new_version, to, source, source_path)
        self._jobs[public.id] = job
        self._pool.submit(self._run, job)
        return public

    def _run(self, job: QuantizeJob) -> None:
        try:
            job.update(state="running", step="quantizing", progress=0.1)
            with tempfile.TemporaryDirectory(dir=self._store.root) as scratch:
                out = Path(scratch) / ("quantized.onnx" if job.source.format == "onnx" else "quantized.gguf")
                result = self._quantize(job, out)
                job.update(step="storing", progress=0.7)
                result_body = self._register(job, out, result.size_before)
            job.update(state="succeeded", step="done", progress=1.0, result=result_body, finished_at=utcnow())
        except Exception as exc:  # a job reports every failure in its status instead of dying silently
            log.exception("quantize job %s failed", job.public.id)
            job.update(state="failed", step="failed", error=str(exc), finished_at=utcnow())

    @staticmethod
    def _quantize(job: QuantizeJob, out: Path) -> Any:
        from slmops.modelopt import quantize_gguf, quantize_onnx_int8

        if job.source.format == "onnx":
            return quantize_onnx_int8(job.source_path, out)
        return quantize_gguf(job.source_path, out, job.to)

    def _register(self, job: QuantizeJob, out: Path, size_before: int) -> dict[str, Any]:
        from slmops.modelopt.quantize import file_sha256

        size_after = out.stat().st_size
        sha256 = file_sha256(out)
        fmt, metadata = sniff_artifact(out)
        blob = self._store.adopt(out, sha256, size_after)
        reduction = round(1.0 - size_after / size_before, 4)
        metrics = {"size_reduction": reduction, "parent_size_bytes": size_before, "size_bytes": size_after}
        with Session(self._engine, expire_on_commit=False) as session:
            model, _ = registry.get_version(session, job.model, job.version)
            spec = VersionSpec(
                version=job.new_version,
                parent=job.version,
                relation="quantized_from",
                eval_metrics=metrics,
                notes=f"quantized to {job.to} by job {job.public.id}",
            )
            row = registry.create_version(session, model=model, spec=spec, created_by=job.public.created_by)
            registry.add_stored_artifact(
                session,
                version=row,
                blob=blob,
                fmt=fmt,
                file_metadata=metadata,
                spec=ArtifactSpec(quantization=job.to),
            )
            audit.record(
                session,
                actor=job.public.created_by,
                action="version.quantize",
                target=f"{job.model}@{job.new_version}",
                request_id=job.public.id,
                source_sha256=job.source.sha256,
                sha256=sha256,
            )
            session.commit()
        return {"model": job.model, "version": job.new_version, "sha256": sha256, **metrics}

    def wait_idle(self) -> None:
        """Block until queued jobs ran (shutdown and tests)."""
        self._pool.submit(lambda: None).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
