"""Dashboard sign-in is a server-side session; cross-site form posts are refused; /docs loads nothing foreign."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.models import DashboardSession, Role
from control_plane.security import hash_secret
from control_plane.services import auth

SAME_SITE = {"Origin": "http://testserver"}


def _token(engine: sa.Engine) -> str:
    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name="dash", role=Role.viewer)
        session.commit()
    return plaintext


def _sign_in(client: TestClient, token: str) -> str:
    response = client.post("/login", data={"token": token, "next": "/"}, headers=SAME_SITE, follow_redirects=False)
    assert response.status_code == 303, response.text
    return response.cookies["slmops_session"]


def test_the_cookie_holds_a_session_id_whose_hash_alone_is_stored(client: TestClient, engine: sa.Engine) -> None:
    token = _token(engine)
    session_id = _sign_in(client, token)
    assert session_id != token and len(session_id) >= 40
    with Session(engine) as session:
        (row,) = session.exec(select(DashboardSession)).all()
    assert row.id_hash == hash_secret(session_id) and session_id not in row.id_hash


def test_logout_ends_the_session_on_the_server(client: TestClient, engine: sa.Engine) -> None:
    session_id = _sign_in(client, _token(engine))
    assert client.get("/", follow_redirects=False).status_code == 200
    assert client.post("/logout", headers=SAME_SITE, follow_redirects=False).status_code == 303
    # A copy of the cookie taken before the sign-out (a stolen one) no longer opens anything.
    client.cookies.set("slmops_session", session_id)
    assert client.get("/", follow_redirects=False).status_code == 303
    with Session(engine) as session:
        assert session.exec(select(DashboardSession)).all() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/page"},
        {},  # neither: a browser always sends Origin on a form post
    ],
)
def test_cross_site_form_posts_are_refused(client: TestClient, engine: sa.Engine, headers: dict[str, str]) -> None:
    token = _token(engine)
    login = client.post("/login", data={"token": token, "next": "/"}, headers=headers, follow_redirects=False)
    assert login.status_code == 403 and login.json()["code"] == "cross_site_request"
    assert "set-cookie" not in login.headers
    _sign_in(client, token)
    logout = client.post("/logout", headers=headers, follow_redirects=False)
    assert logout.status_code == 403 and logout.json()["code"] == "cross_site_request"
    assert client.get("/", follow_redirects=False).status_code == 200  # still signed in


def test_a_same_site_referer_is_enough(client: TestClient, engine: sa.Engine) -> None:
    response = client.post(
        "/login",
        data={"token": _token(engine), "next": "/"},
        headers={"Referer": "http://testserver/login?next=/"},
        follow_redirects=False,
    )
    assert response.status_code == 303


def test_docs_load_only_this_servers_scripts(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/static/") for s in sources), sources
    assert "<script>" not in page.text  # no inline script for the policy to allow
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 0, source
    assert "SwaggerUIBundle" in client.get("/docs/static/swagger-ui-bundle.js").text
    assert client.get("/docs/static/..%2Fdocs.py").status_code == 404


def test_the_cookie_is_secure_behind_an_https_public_url(app, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = app.state.settings.model_copy(update={"public_url": "https://dash.example"})
    with TestClient(app) as client:
        form = {"token": _token(engine), "next": "/"}
        response = client.post("/login", data=form, headers={"Origin": "https://dash.example"}, follow_redirects=False)
    assert response.status_code == 303 and "secure" in response.headers["set-cookie"].lower()
