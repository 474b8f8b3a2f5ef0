"""Liveness and readiness: `/healthz` (process up), `/readyz` (database reachable, schema at head)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from control_plane import db

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> Any:
    engine: sa.Engine = request.app.state.engine
    checks: dict[str, str] = {}
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
        checks["migrations"] = "ok" if db.is_at_head(engine) else "behind head: run `slmops db upgrade`"
    except sa.exc.SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
    )
