"""Model optimisation on registry versions: store eval metrics, start quantization jobs."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from control_plane.api.deps import MutationDep, OperatorDep, SessionDep, ViewerDep
from control_plane.schemas import VersionPublic
from control_plane.services import registry
from control_plane.services.eval_metrics import EvalMetricsUpdate, golden_set, store_eval_metrics, store_golden_set
from control_plane.services.quantize_jobs import JobPublic, QuantizeJobs, QuantizeRequest
from shared.desired import GoldenSet

router = APIRouter(prefix="/v1/models", tags=["models"])


_RUNNER_LOCK = threading.Lock()


def quantize_jobs(request: Request) -> QuantizeJobs:
    """The app's job runner, created on first use (apps that never quantize start no thread).

    Created once per process under a lock: a second runner would fail the first one's jobs as
    interrupted. The control plane runs jobs in one process (like its controller).
    """
    state = request.app.state
    with _RUNNER_LOCK:
        if getattr(state, "quantize_jobs", None) is None:
            state.quantize_jobs = QuantizeJobs(state.engine, state.blob_store)
    return state.quantize_jobs  # type: ignore[no-any-return]


@router.put("/{name}/versions/{version}/eval-metrics", response_model=VersionPublic)
def put_eval_metrics(
    name: str, version: str, update: EvalMetricsUpdate, principal: OperatorDep, mutation: MutationDep
) -> Any:
    model, row = registry.get_version(mutation.session, name, version)
    store_eval_metrics(mutation.session, version=row, update=update)
    mutation.audit(principal, "version.eval_metrics", f"{name}@{version}", keys=sorted(update.metrics))
    body = registry.version_public(mutation.session, model, row)
    mutation.commit(principal, 200, body)
    return body


@router.put("/{name}/versions/{version}/golden-set", response_model=GoldenSet)
def put_golden_set(name: str, version: str, golden: GoldenSet, principal: OperatorDep, mutation: MutationDep) -> Any:
    """Attach a golden-prompt set: devices answer it during the trial and rollouts can gate on it."""
    _, row = registry.get_version(mutation.session, name, version)
    store_golden_set(mutation.session, version=row, golden=golden)
    mutation.audit(principal, "version.golden_set", f"{name}@{version}", prompts=len(golden.prompts))
    mutation.commit(principal, 200, golden)
    return golden


@router.get("/{name}/versions/{version}/golden-set", response_model=GoldenSet)
def get_golden_set(name: str, version: str, _: ViewerDep, session: SessionDep) -> Any:
    return golden_set(registry.get_version(session, name, version)[1])


@router.post("/{name}/versions/{version}/quantize", status_code=202, response_model=JobPublic)
async def quantize_version(
    name: str, version: str, spec: QuantizeRequest, request: Request, principal: OperatorDep, mutation: MutationDep
) -> Any:
    """Queue a quantization of the version's float artifact; poll `GET /v1/jobs/{id}`."""
    jobs = quantize_jobs(request)
    job = await run_in_threadpool(
        jobs.prepare, mutation.session, model=name, version=version, request=spec, actor=principal.actor
    )
    mutation.audit(principal, "job.create", f"{name}@{version}", job_id=job.id, to=spec.to)
    body = JobPublic.model_validate(job)
    mutation.session.commit()
    jobs.start(job.id)  # after the commit, so the worker finds the row
    return body
