"""`/v1/jobs`: status and progress of background jobs (quantization)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from control_plane.api.deps import SessionDep, ViewerDep
from control_plane.services.quantize_jobs import JobPublic, QuantizeJobs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, _: ViewerDep) -> Any:
    return QuantizeJobs.get(session, job_id)
