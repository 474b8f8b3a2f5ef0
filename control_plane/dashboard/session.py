"""Dashboard sign-in: the operator's API token in an HttpOnly cookie, checked on every request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

from control_plane.api.deps import SessionDep, touch_token
from control_plane.errors import DomainError
from control_plane.services.auth import Principal, authenticate_token

COOKIE_NAME = "slmops_token"
COOKIE_MAX_AGE_S = 12 * 3600


def cookie_principal(request: Request, session: SessionDep) -> Principal | None:
    """The token's principal, or None when the cookie is missing, unknown or revoked."""
    token = request.cookies.get(COOKIE_NAME, "").strip()
    if not token:
        return None
    try:
        principal = authenticate_token(session, token)
    except DomainError:
        return None
    touch_token(session, principal.id)
    request.state.actor = principal.actor
    return principal


ViewerCookieDep = Annotated[Principal | None, Depends(cookie_principal)]


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


def set_token_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=COOKIE_MAX_AGE_S,
        httponly=True,  # never readable from JS: the token stays out of scripts
        samesite="strict",  # no cross-site request carries it, so form posts need no CSRF token
        secure=request.url.scheme == "https",
        path="/",
    )


def clear_token_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
