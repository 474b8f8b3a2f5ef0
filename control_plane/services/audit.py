"""Every mutating request leaves an audit row, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from control_plane.models import AuditEntry


def record(
    session: Session, *, actor: str, action: str, target: str, request_id: str, actor_id: str = "", **detail: Any
) -> None:
    row = AuditEntry(actor=actor, actor_id=actor_id, action=action, target=target, request_id=request_id, detail=detail)
    session.add(row)
