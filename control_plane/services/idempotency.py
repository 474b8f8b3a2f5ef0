"""`Idempotency-Key` for creating POSTs: same key and body replay the stored response.

The same key with another body is refused (422), as in the IETF httpapi idempotency draft.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import IdempotencyRecord, as_utc, utcnow
from control_plane.services.auth import Principal


def scope(principal: Principal) -> str:
    """Keys belong to one credential: by id, since two tokens may share a name."""
    return f"{principal.kind}:{principal.id}"


def fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps([method, path, body], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lookup(
    session: Session, *, key: str, principal: str, print_: str, ttl_s: int
) -> tuple[int, dict[str, Any]] | None:
    """Return the stored (status, body) for this key, None if new; 422 if reused with another body."""
    record = session.get(IdempotencyRecord, (key, principal))
    if record is None:
        return None
    created = as_utc(record.created_at)
    if created is not None and created < utcnow() - timedelta(seconds=ttl_s):
        session.delete(record)
        session.flush()
        return None
    if record.fingerprint != print_:
        raise DomainError(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            "this Idempotency-Key was already used with a different request body",
        )
    return record.status_code, record.response


def store(
    session: Session, *, key: str, principal: str, print_: str, status_code: int, body: dict[str, Any]
) -> None:
    session.add(
        IdempotencyRecord(
            key=key, principal=principal, fingerprint=print_, status_code=status_code, response=body
        )
    )
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won; its response stands
        session.rollback()
