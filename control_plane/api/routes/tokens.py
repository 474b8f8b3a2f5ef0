"""`/v1/tokens` (admin): create, list and revoke operator API tokens; `/v1/audit` to read the trail."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from sqlmodel import select

from control_plane.api.deps import AdminDep, MutationDep, SessionDep
from control_plane.models import ApiToken, AuditEntry, Role
from control_plane.schemas import AuditPublic, Page, TokenCreate, TokenCreated, TokenPublic
from control_plane.services import auth, pagination

router = APIRouter(prefix="/v1", tags=["tokens"])


@router.post("/tokens", status_code=201, response_model=TokenCreated)
def create_token(spec: TokenCreate, principal: AdminDep, mutation: MutationDep) -> Any:
    """The plaintext token is in this response only; the server keeps its hash."""
    if (replayed := mutation.replay(principal, spec)) is not None:
        return replayed
    token, plaintext = auth.create_token(
        mutation.session, name=spec.name, role=Role[spec.role], created_by=principal.actor
    )
    mutation.audit(principal, "token.create", token.id, role=spec.role, name=spec.name)
    body = TokenCreated.model_validate({**token.model_dump(), "token": plaintext})
    mutation.commit(principal, 201, body, secrets=("token",))
    return body


@router.get("/tokens", response_model=Page[TokenPublic])
def list_tokens(
    session: SessionDep, _: AdminDep, cursor: str | None = None, limit: int = Query(50, ge=1, le=500)
) -> Any:
    stmt = pagination.apply_page(select(ApiToken), ApiToken.created_at, ApiToken.id, cursor, limit)
    rows, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    return Page[TokenPublic](data=[TokenPublic.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: str, principal: AdminDep, mutation: MutationDep) -> Any:
    token = auth.revoke_token(mutation.session, token_id)
    mutation.audit(principal, "token.revoke", token.id)
    body = TokenPublic.model_validate(token)
    mutation.commit(principal, 200, body)
    return body


@router.get("/audit", response_model=Page[AuditPublic])
def list_audit(
    session: SessionDep,
    _: AdminDep,
    action: str | None = None,
    cursor: str | None = None,
    limit: int = Query(100, ge=1, le=500),
) -> Any:
    stmt = select(AuditEntry)
    if action:
        stmt = stmt.where(AuditEntry.action == action)
    stmt = pagination.apply_page(stmt, AuditEntry.created_at, AuditEntry.id, cursor, limit)
    rows, next_cursor = pagination.split_page(list(session.exec(stmt).all()), limit)
    return Page[AuditPublic](data=[AuditPublic.model_validate(r) for r in rows], next_cursor=next_cursor)
