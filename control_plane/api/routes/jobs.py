"""`/v1/jobs`: status and progress of background jobs (quantization)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from control_plane.api.deps import ViewerDep
from control_plane.api.routes.modelopt import quantize_jobs
from control_plane.services.quantize_jobs import JobPublic

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, request: Request, _: ViewerDep) -> Any:
    return quantize_jobs(request).get(job_id)
