"""`/v1/admin/*`: desired state, rollback and status for `slmops agent` commands on the same device.

Guarded by a random token in `<data_dir>/admin.token` (mode 0600): reading it needs the agent's
file permissions, so other local users cannot change the model even though the API is loopback.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request

from edge_agent.api.errors import APIError, ApiErrorCode
from edge_agent.errors import AgentError
from shared.desired import DesiredState

_WAIT_S = 600.0


def _require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    expected = request.app.state.admin_token
    presented = (authorization or "").removeprefix("Bearer ").strip()
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise APIError(
            401, "admin token missing or wrong", type_="authentication_error", code=ApiErrorCode.UNAUTHORIZED
        )


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(_require_admin)])


@router.get("/state")
def state(request: Request) -> dict[str, Any]:
    agent = request.app.state.agent
    progress = agent.last_progress
    window = agent.last_window
    return {
        "state": agent.device_state().model_dump(mode="json"),
        "ready": agent.ready,
        "swap_mode": agent.reconciler.activator.last_swap_mode,
        "download": progress.__dict__ if progress else None,
        "telemetry": window.model_dump(mode="json") if window else None,
    }


@router.post("/desired")
async def apply_desired(desired: DesiredState, request: Request, wait: bool = True) -> dict[str, Any]:
    agent = request.app.state.agent
    future = agent.submit_desired(desired)
    if wait:
        await _finish(future)
    return agent.device_state().model_dump(mode="json")


@router.post("/rollback")
async def rollback(request: Request) -> dict[str, Any]:
    agent = request.app.state.agent
    await _finish(agent.request_rollback())
    return agent.device_state().model_dump(mode="json")


@router.post("/telemetry/flush")
def flush_telemetry(request: Request) -> dict[str, Any]:
    window = request.app.state.agent.emit_telemetry()
    return window.model_dump(mode="json")


async def _finish(future: Any) -> None:
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), _WAIT_S)
    except AgentError as exc:
        refused = APIError(409, str(exc))
        refused.code = exc.code  # the agent error's own code, as its state reports it
        raise refused from exc
    except TimeoutError as exc:
        raise APIError(
            504, "the agent is still working on it", type_="server_error", code=ApiErrorCode.TIMEOUT
        ) from exc
