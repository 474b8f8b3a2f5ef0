"""Health, readiness, Prometheus metrics, and `/v1/infer` for ONNX tensor models."""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.api.errors import APIError, ApiErrorCode, model_unavailable
from edge_agent.api.generation import check_model_name
from edge_agent.api.schemas import InferRequest
from edge_agent.runtime import EngineError, UnsupportedOperation
from edge_agent.serving import NoModelError
from edge_agent.telemetry import RequestRecord

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Alive: the process answers. Says nothing about a model (that is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(request: Request) -> JSONResponse | dict[str, Any]:
    agent = request.app.state.agent
    current = agent.slot.current
    if current is None:
        if not agent.started.is_set():
            reason = "starting: verifying and loading the stored model"
        else:
            reason = agent.slot.unavailable_reason or "no model is loaded"
        return model_unavailable(reason).response()
    spec = current.spec
    return {
        "status": "ready",
        "model": spec.model,
        "version": spec.version,
        "phase": agent.device_state().phase,
    }


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.agent.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/infer")
async def infer(body: InferRequest, request: Request) -> dict[str, Any]:
    agent, queue = request.app.state.agent, request.app.state.queue
    started = time.perf_counter()
    await queue.enter()
    try:
        lease = agent.slot.lease()
        model = lease.__enter__()
    except NoModelError as exc:
        queue.leave(time.perf_counter() - started)
        raise model_unavailable(str(exc), exc.retry_after_s) from exc
    error: str | None = None
    try:
        if body.model is not None:
            check_model_name(model, body.model)
        outputs = await anyio.to_thread.run_sync(model.engine.infer, body.inputs)
        return {"model": model.spec.model, "version": model.spec.version, "outputs": outputs}
    except APIError as exc:
        error = exc.code
        raise
    except UnsupportedOperation as exc:
        error = ApiErrorCode.UNSUPPORTED_OPERATION
        raise APIError(400, str(exc), code=error) from exc
    except EngineError as exc:  # onnxruntime rejects the tensors: the caller's input is at fault
        error = ApiErrorCode.INVALID_INPUTS
        raise APIError(400, str(exc), param="inputs", code=error) from exc
    finally:
        lease.__exit__(None, None, None)
        queue.leave(time.perf_counter() - started)
        # Tensor errors are the caller's; only successful calls count towards the model's trial.
        agent.record_request(
            "infer", None if error else model, RequestRecord(time.perf_counter() - started, error_type=error)
        )
