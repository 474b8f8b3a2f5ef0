"""`GET /metrics`: Prometheus text exposition. No auth, like `/healthz`: it holds only aggregate
counts, and scrapers rarely carry tokens; keep the port off the public network in production."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST

from control_plane import metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def scrape(request: Request) -> Response:
    fleet = getattr(request.app.state, "fleet", None)
    body = await run_in_threadpool(metrics.render, request.app.state.engine, fleet)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
