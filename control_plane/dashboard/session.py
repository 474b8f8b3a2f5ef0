"""Dashboard sign-in: a random session id in an HttpOnly cookie; the server keeps its hash -> token id.

Signing out deletes the row, and revoking the token ends every session made with it. Every
state-changing form post depends on `SameOriginDep`: its Origin (or Referer) must be this site.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import Depends, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from sqlmodel import Session, col

from control_plane.api.deps import SessionDep, SettingsDep, touch_token
from control_plane.config import Settings
from control_plane.errors import DomainError, ErrorCode
from control_plane.models import ApiToken, DashboardSession, Role, as_utc, utcnow
from control_plane.security import hash_secret, new_secret
from control_plane.services.auth import Principal

COOKIE_NAME = "slmops_session"


def cookie_principal(request: Request, session: SessionDep) -> Principal | None:
    """The signed-in token's principal, or None when the cookie is missing, unknown, expired or revoked."""
    session_id = request.cookies.get(COOKIE_NAME, "").strip()
    if not session_id:
        return None
    row = session.get(DashboardSession, hash_secret(session_id))
    expires = as_utc(row.expires_at) if row else None
    token = session.get(ApiToken, row.token_id) if row else None
    if token is None or token.revoked_at is not None or expires is None or expires < utcnow():
        return None
    principal = Principal(kind="token", id=token.id, name=token.name, role=Role[token.role])
    touch_token(session, principal.id)
    request.state.actor = principal.actor
    return principal


ViewerCookieDep = Annotated[Principal | None, Depends(cookie_principal)]


def start_session(session: Session, *, token_id: str, ttl_s: int) -> str:
    """A new session for the token; returns the id for the cookie (the table keeps its hash only)."""
    session.execute(sa.delete(DashboardSession).where(col(DashboardSession.expires_at) < utcnow()))
    session_id = new_secret()
    session.add(
        DashboardSession(
            id_hash=hash_secret(session_id), token_id=token_id, expires_at=utcnow() + timedelta(seconds=ttl_s)
        )
    )
    session.commit()
    return session_id


def end_session(request: Request, session: Session) -> None:
    session_id = request.cookies.get(COOKIE_NAME, "").strip()
    if session_id:
        session.execute(sa.delete(DashboardSession).where(col(DashboardSession.id_hash) == hash_secret(session_id)))
        session.commit()


def require_same_origin(request: Request, settings: SettingsDep) -> None:
    """Refuse a form post whose Origin (or, without one, Referer) is not this site: no cross-site posts."""
    sent = request.headers.get("origin") or request.headers.get("referer") or ""
    parts = urlsplit(sent)
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    allowed = {str(request.base_url).rstrip("/").lower()}
    if settings.public_url:
        public = urlsplit(settings.public_url)
        allowed.add(f"{public.scheme}://{public.netloc}".lower())
    if origin not in allowed:
        raise DomainError(ErrorCode.CROSS_SITE_REQUEST, "this form must be posted from the dashboard's own pages")


SameOriginDep = Annotated[None, Depends(require_same_origin)]


def safe_next(target: str | None) -> str:
    """Only same-site paths: `//host` or `https://...` would turn the login into an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def sign_in_required(request: Request, partial: str | None) -> Response:
    # A live refresh gets a 401 (the script then reloads to the login page); a page gets a redirect.
    if partial:
        return PlainTextResponse("sign in again", status_code=401)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={_quote(here)}", status_code=303)


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def set_session_cookie(request: Request, response: Response, session_id: str, settings: Settings) -> None:
    # Secure whenever the dashboard is reached over https, a TLS-terminating proxy included.
    secure = request.url.scheme == "https" or (settings.public_url or "").startswith("https://")
    response.set_cookie(
        COOKIE_NAME,
        session_id,
        max_age=settings.dashboard_session_ttl_s,
        httponly=True,  # never readable from JS
        samesite="strict",  # no cross-site request carries it
        secure=secure,
        path="/",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
