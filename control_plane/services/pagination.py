"""Keyset pagination: `limit` + an opaque cursor over (created_at, id), stable under inserts."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import as_utc

MAX_LIMIT = 500


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([as_utc(created_at).isoformat(), row_id])  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), str(row_id)
    except Exception as exc:  # any garbage in the cursor is the caller's mistake
        raise DomainError(
            ErrorCode.VALIDATION_ERROR, "the cursor is not valid; pass back next_cursor as given"
        ) from exc


def apply_page(stmt: Any, created_col: Any, id_col: Any, cursor: str | None, limit: int) -> Any:
    if cursor:
        created, row_id = decode_cursor(cursor)
        stmt = stmt.where(
            sa.tuple_(created_col, id_col)
            > sa.tuple_(sa.literal(created, created_col.type), sa.literal(row_id, id_col.type))
        )
    return stmt.order_by(created_col, id_col).limit(limit + 1)


def split_page(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    last = page[-1]
    return page, encode_cursor(last.created_at, last.id)
