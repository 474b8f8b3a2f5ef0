"""Dashboard without a browser: sign-in with the cookie, what the pages count, escaping, chart data."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.dashboard import telemetry
from control_plane.dashboard.render import human_bytes
from control_plane.models import ApiToken, DesiredStateRow, Device, Role, TelemetryRecord, utcnow
from control_plane.rollouts.gates import merged_percentile
from control_plane.services import auth
from shared.telemetry import REQUEST_DURATION_BUCKETS

SAME_SITE = {"Origin": "http://testserver"}  # what a browser sends on the dashboard's own form posts


def _token(engine: sa.Engine, role: Role = Role.viewer) -> tuple[str, str]:
    with Session(engine) as session:
        row, plaintext = auth.create_token(session, name=f"dash-{role.name}", role=role)
        session.commit()
        return row.id, plaintext


def _sign_in(client: TestClient, token: str) -> None:
    response = client.post("/login", data={"token": token, "next": "/"}, follow_redirects=False, headers=SAME_SITE)
    assert response.status_code == 303, response.text


def _stat(html: str, name: str) -> str:
    match = re.search(rf'id="stat-{name}">([^<]*)<', html)
    assert match, f"no stat {name}"
    return match.group(1)


def test_pages_ask_for_a_token_first(client: TestClient) -> None:
    page = client.get("/devices?status=online", follow_redirects=False, headers=SAME_SITE)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Fdevices%3Fstatus%3Donline"
    assert client.get("/?partial=live").status_code == 401  # the live refresh sends the page to sign-in
    assert client.get("/ui/api/telemetry").status_code == 401
    form = client.get("/login?next=/devices")
    assert form.status_code == 200 and 'name="next" value="/devices"' in form.text
    assert "script-src 'self'" in form.headers["content-security-policy"]


def test_login_checks_the_token_and_sets_an_httponly_cookie(client: TestClient, engine: sa.Engine) -> None:
    refused = client.post("/login", data={"token": "slm_wrong", "next": "/"}, follow_redirects=False, headers=SAME_SITE)
    assert refused.status_code == 401 and "unknown or revoked" in refused.text
    assert "set-cookie" not in refused.headers

    token_id, token = _token(engine)
    form = {"token": token, "next": "/registry"}
    accepted = client.post("/login", data=form, follow_redirects=False, headers=SAME_SITE)
    assert accepted.status_code == 303 and accepted.headers["location"] == "/registry"
    cookie = accepted.headers["set-cookie"]
    assert cookie.startswith("slmops_session=") and token not in cookie  # a session id, never the token
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert client.get("/registry").status_code == 200
    with Session(engine) as session:  # the token list shows when it was last used, dashboard included
        assert session.get(ApiToken, token_id).last_used_at is not None  # type: ignore[union-attr]


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_login_never_redirects_off_site(client: TestClient, engine: sa.Engine, target: str) -> None:
    _, token = _token(engine)
    response = client.post("/login", data={"token": token, "next": target}, follow_redirects=False, headers=SAME_SITE)
    assert response.headers["location"] == "/"


def test_the_cookie_does_not_open_the_json_api(client: TestClient, engine: sa.Engine) -> None:
    _, token = _token(engine, Role.admin)
    _sign_in(client, token)
    assert client.get("/").status_code == 200
    response = client.get("/v1/devices")
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"


def test_a_revoked_token_is_signed_out(client: TestClient, engine: sa.Engine) -> None:
    token_id, token = _token(engine)
    _sign_in(client, token)
    with Session(engine) as session:
        auth.revoke_token(session, token_id)
        session.commit()
    response = client.get("/", follow_redirects=False, headers=SAME_SITE)
    assert response.status_code == 303 and response.headers["location"].startswith("/login")


def test_logout_clears_the_cookie(client: TestClient, engine: sa.Engine) -> None:
    _, token = _token(engine)
    _sign_in(client, token)
    response = client.post("/logout", follow_redirects=False, headers=SAME_SITE)
    assert response.status_code == 303 and 'slmops_session=""' in response.headers["set-cookie"]
    assert client.get("/", follow_redirects=False, headers=SAME_SITE).status_code == 303


def _fleet(client: TestClient, admin_headers: dict[str, str], engine: sa.Engine) -> None:
    """Five devices: three online (two on v1, one on v2 though it should be on v1), one offline, one pending."""
    for name, region in (("a", "eu"), ("b", "eu"), ("c", "us"), ("d", "us"), ("e", "eu")):
        assert client.post(
            "/v1/devices", json={"name": name, "labels": {"region": region}}, headers=admin_headers
        ).is_success
    states: dict[str, dict[str, Any]] = {
        "a": {"status": "online", "current_version": "1", "current_sha256": "1" * 64},
        "b": {"status": "online", "current_version": "1", "current_sha256": "1" * 64},
        "c": {"status": "online", "current_version": "2", "current_sha256": "2" * 64, "phase": "activation_failed",
              "phase_reason": "smoke test failed", "acked_message_id": "m1"},
        "d": {"status": "offline", "current_version": "1", "current_sha256": "1" * 64},
    }  # fmt: skip
    with Session(engine) as session:
        for device in session.exec(select(Device)).all():
            for key, value in states.get(device.name, {}).items():
                setattr(device, key, value)
            device.current_model = "tiny" if device.name in states else None
            session.add(device)
            if device.name == "c":
                session.add(DesiredStateRow(device_id=device.id, message_id="m1", model="tiny", version="1",
                                            artifact_sha256="1" * 64, published_message_id="m1"))  # fmt: skip
        session.commit()


def test_overview_counts_devices_and_explains_drift(client: TestClient, admin_headers, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    _fleet(client, admin_headers, engine)
    _sign_in(client, _token(engine)[1])
    html = client.get("/").text
    assert (_stat(html, "total"), _stat(html, "online"), _stat(html, "offline")) == ("5", "3", "1")
    assert (_stat(html, "pending"), _stat(html, "drift")) == ("1", "1")
    by_version = re.findall(r'data-version="([^"]+)">.*?data-count>(\d+)<', html, flags=re.S)
    assert by_version == [("tiny@1", "3"), ("no model", "1"), ("tiny@2", "1")]
    drift = html.split('id="drift"')[1].split("</table>")[0]
    assert "activation_failed: smoke test failed" in drift
    live = client.get("/?partial=live").text  # the block the page swaps in every 2 s
    assert not live.lstrip().startswith("<!doctype") and _stat(live, "total") == "5"


def test_devices_table_filters(client: TestClient, admin_headers, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    _fleet(client, admin_headers, engine)
    _sign_in(client, _token(engine)[1])

    def shown(query: str) -> list[str]:
        return sorted(re.findall(r'<tr data-device="([^"]+)"', client.get(f"/devices?{query}").text))

    assert shown("") == ["a", "b", "c", "d", "e"]
    assert shown("selector=region%3Deu") == ["a", "b", "e"]
    assert shown("selector=region%3Deu&status=online") == ["a", "b"]
    assert shown("version=2") == ["c"]
    bad = client.get("/devices?selector=region%3D%3D")
    assert bad.status_code == 200 and "cannot parse selector" in bad.text


def test_everything_shown_is_escaped(client: TestClient, operator_headers, engine: sa.Engine) -> None:  # type: ignore[no-untyped-def]
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    assert client.post("/v1/models", json={"name": "tiny", "description": evil}, headers=operator_headers).is_success
    _sign_in(client, _token(engine)[1])
    html = client.get("/registry").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script>alert" not in html and "<img" not in html


def test_registry_shows_artifacts_and_lineage(
    client: TestClient, operator_headers, engine, tiny_gguf, tiny_gguf_other
) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    assert client.post("/v1/models", json={"name": "tiny"}, headers=operator_headers).is_success
    for version, path, extra in (
        ("1", tiny_gguf, {}),
        ("2", tiny_gguf_other, {"parent": "1", "relation": "distilled_from"}),
    ):
        with path.open("rb") as fh:
            response = client.post("/v1/models/tiny/versions", data={"version": version, **extra},
                                   files={"file": (path.name, fh)}, headers=operator_headers)  # fmt: skip
        assert response.status_code == 201, response.text
    _sign_in(client, _token(engine)[1])
    html = client.get("/registry").text
    v2 = html.split('data-version="2"')[1].split("</article>")[0]
    assert hashlib.sha256(tiny_gguf_other.read_bytes()).hexdigest() in v2
    assert "distilled from" in v2 and "tiny@1" in v2
    assert "<td>gguf</td>" in v2 and human_bytes(tiny_gguf_other.stat().st_size) in v2


def _window(
    device: str, seq: int, seconds_ago: float, latency_s: float, rss_mb: float, version: str
) -> TelemetryRecord:
    counts = [0] * (len(REQUEST_DURATION_BUCKETS) + 1)
    index = next(i for i, bound in enumerate(REQUEST_DURATION_BUCKETS) if latency_s <= bound)
    counts[index] = 10
    end = utcnow() - timedelta(seconds=seconds_ago)
    return TelemetryRecord(
        device_id=device, message_id=f"{device}-{seq}", seq=seq, window_start=end - timedelta(seconds=1),
        window_end=end, model="tiny", version=version, requests=10, latency_p95_ms=latency_s * 1000,
        rss_bytes=int(rss_mb * 2**20), latency_histogram={"bounds": list(REQUEST_DURATION_BUCKETS), "counts": counts},
    )  # fmt: skip


def test_chart_series_merge_histograms_and_match_the_rest_api(
    client: TestClient, engine: sa.Engine, viewer_headers: dict[str, str]
) -> None:
    rows = [
        _window("d1", 1, 100, 0.03, 100, "1"),
        _window("d2", 1, 100, 0.3, 140, "1"),  # same time, another device: merged, not averaged
        _window("d1", 2, 20, 0.03, 110, "2"),
    ]
    histograms = [rows[0].latency_histogram, rows[1].latency_histogram]
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
    since = utcnow() - timedelta(seconds=600)
    with Session(engine) as session:
        charts = telemetry.version_series(session, since=since, step_s=600)
    p95 = {s["name"]: s["points"] for s in charts["p95_ms"]}
    rss = {s["name"]: s["points"] for s in charts["rss_mb"]}
    assert sorted(p95) == ["tiny@1", "tiny@2"] and len(p95["tiny@1"]) == 1
    # Far above d1's 30 ms: the merged p95 lies in d2's slow bucket.
    assert p95["tiny@1"][0][1] > 200 and p95["tiny@1"][0][1] == pytest.approx(
        merged_percentile(histograms, 0.95) * 1000,
        rel=0.05,  # type: ignore[operator]
    )
    assert rss["tiny@1"][0][1] == pytest.approx(120.0) and rss["tiny@2"][0][1] == pytest.approx(110.0)

    rest = client.get(
        "/v1/telemetry/versions",
        params={"model": "tiny", "version": "1", "start": since.isoformat(), "step": "600"},
        headers=viewer_headers,
    ).json()
    shown = [p for p in rest["points"] if p["latency_p95_ms"] is not None]
    assert [round(p["latency_p95_ms"], 3) for p in shown] == [p95["tiny@1"][0][1]]

    _sign_in(client, _token(engine)[1])
    body = client.get("/ui/api/telemetry?range=5m").json()
    assert {s["name"] for s in body["p95_ms"]} == {"tiny@1", "tiny@2"} and body["step_s"] == 5
    assert client.get("/ui/api/telemetry?range=24h").json()["step_s"] == 1440  # whole minutes: rollups answer


def test_static_files_are_served_from_the_package_only(client: TestClient) -> None:
    css = client.get("/ui/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = client.get("/ui/static/dashboard.js")
    assert js.status_code == 200 and "lineChart" in js.text and "slmops_session" not in js.text
    assert client.get("/ui/static/..%2Fqueries.py").status_code == 404
    assert client.get("/ui/static/routes.py").status_code == 404


def test_an_unknown_rollout_is_a_404_page(client: TestClient, engine: sa.Engine) -> None:
    _sign_in(client, _token(engine)[1])
    response = client.get("/rollouts/no-such-rollout")
    assert response.status_code == 404 and "There is no rollout no-such-rollout" in response.text


def test_a_rollout_page_renders_whatever_its_evaluations_hold(client: TestClient, engine: sa.Engine) -> None:
    """Evaluations without an activation check, with a gate that had no value, or with no details."""
    from control_plane.models import GateEvaluation, Model, ModelVersion, Rollout

    plan = {"stages": [{"name": "canary", "count": 1, "min_bake_s": 60}, {"name": "fleet", "percent": 100}]}
    with Session(engine) as session:
        model = Model(name="tiny")
        session.add(model)
        session.flush()
        version = ModelVersion(model_id=model.id, version="1")
        session.add(version)
        session.flush()
        rollout = Rollout(model_id=model.id, version_id=version.id, plan=plan, state="paused")
        session.add(rollout)
        session.flush()
        checks = [{"gate": "max_error_rate", "result": "inconclusive", "value": None, "limit": 0.05}]
        session.add(GateEvaluation(rollout_id=rollout.id, stage_index=0, result="inconclusive", details={}))
        session.add(
            GateEvaluation(rollout_id=rollout.id, stage_index=0, result="inconclusive", details={"checks": checks})
        )
        session.commit()
        rollout_id = rollout.id
    _sign_in(client, _token(engine)[1])
    html = client.get(f"/rollouts/{rollout_id}").text
    assert 'data-gate="max_error_rate" data-result="inconclusive"' in html
    assert 'data-count="2"' in html and "badge-paused" in html


def test_a_large_fleet_charts_from_rollups_only(empty_tables: sa.Engine) -> None:
    """Above the raw budget the chart uses whole minutes from the rollups, up to the job's watermark."""
    from control_plane.telemetry.rollup import RetentionPolicy, run_rollup

    with Session(empty_tables) as session:
        session.add_all([_window(f"d{i}", 1, 150, 0.03, 100, "1") for i in range(3)])
        session.commit()
    since = utcnow() - timedelta(seconds=600)
    with Session(empty_tables) as session:
        step_s, _, raw = telemetry.plan_range(session, since, 10, raw_budget=2)
        assert (step_s, raw) == (60, True)  # the rollup job never ran: raw windows are all there is
        run_rollup(session, RetentionPolicy(raw_s=86400, minute_s=14 * 86400, hour_s=400 * 86400))
        session.add(_window("late", 1, 1, 0.3, 500, "2"))  # after the watermark: not charted yet
        session.commit()
        step_s, end, raw = telemetry.plan_range(session, since, 10, raw_budget=2)
        assert (step_s, raw) == (60, False) and end <= utcnow()
        charts = telemetry.version_series(session, since=since, step_s=10, raw_budget=2)
    assert charts["step_s"] == 60
    assert [s["name"] for s in charts["rss_mb"]] == ["tiny@1"]
    assert [p[1] for p in charts["rss_mb"][0]["points"]] == [pytest.approx(100.0)]
