"""Every mutating request leaves an audit row, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from control_plane.models import AuditEntry


def record(session: Session, *, actor: str, action: str, target: str, request_id: str, **detail: Any) -> None:
    session.add(AuditEntry(actor=actor, action=action, target=target, request_id=request_id, detail=detail))
