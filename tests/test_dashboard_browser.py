"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against a
running control plane (uvicorn, PostgreSQL or SQLite, Mosquitto) with simulated devices speaking the
real protocol and a live rollout. Asserts on what the page shows and saves screenshots."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from control_plane.api.main import create_app
from control_plane.config import Settings
from control_plane.models import Role
from control_plane.services import auth
from shared.topics import Topics
from tests.support.fleet import enroll_devices, upload_version
from tests.support.server_thread import ServerThread
from tests.support.simulated import SimDevice, TelemetryPump, sim_config, start_sim_devices
from tests.support.waiting import wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MOSQUITTO = "mqtt://127.0.0.1:1883"
SHOWCASE = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "dashboard.png"
LATENCY_MS = {"1": 60.0, "2": 30.0}  # v2 is faster: the charts show the drop
# Long bakes: the rollout stays live at its canary stage (evaluated every tick) until promoted.
LIVE_PLAN = {
    "stages": [
        {"name": "canary", "count": 1, "min_bake_s": 3600},
        {"name": "fleet", "percent": 100, "min_bake_s": 3600},
    ],
    "gates": {"min_samples": 10, "max_p95_latency_ratio": 1.5, "max_error_rate": 0.05, "max_rss_mb": 512},
}
FAST_PLAN = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0.2}], "gates": {"min_samples": 10}}

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)"
    ),
]


@pytest.fixture
def live_server(tmp_path: Path, db_url: str, engine: sa.Engine) -> Iterator[tuple[str, Settings]]:
    """A real control plane on a free port: uvicorn in a thread, fleet runtime on Mosquitto."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        mqtt_url=MOSQUITTO,
        mqtt_topic_prefix=f"slmops-test/{uuid.uuid4().hex[:10]}",
        controller_tick_s=0.3,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:8]}",
    )
    with ServerThread(create_app(settings, engine=engine), lifespan="auto") as server:
        yield server.url, settings
    with engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())


def _token(engine: sa.Engine, role: Role) -> str:
    with Session(engine) as session:
        _, plaintext = auth.create_token(session, name=f"{role.name}-dash", role=role)
        session.commit()
    return plaintext


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _seed_registry(api: httpx.Client, operator: dict[str, str], v1: Path, v2: Path) -> None:
    assert api.post("/v1/models", json={"name": "tiny", "description": "tiny test LM"}, headers=operator).is_success
    upload_version(api, operator, "tiny", "1", v1)  # type: ignore[arg-type]
    fields = {"version": "2", "parent": "1", "relation": "finetuned_from", "eval_metrics": '{"perplexity": 12.5}'}
    with v2.open("rb") as fh:
        response = api.post("/v1/models/tiny/versions", data=fields, files={"file": (v2.name, fh)}, headers=operator)
    assert response.status_code == 201, response.text


def _rollout(api: httpx.Client, operator: dict[str, str], version: str, plan: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/rollouts", json={"model": "tiny", "version": version, **plan}, headers=operator)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _rollout_state(api: httpx.Client, viewer: dict[str, str], rollout_id: str) -> dict[str, Any]:
    return api.get(f"/v1/rollouts/{rollout_id}", headers=viewer).json()  # type: ignore[no-any-return]


def _launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture
def fleet_with_live_rollout(live_server, engine, tiny_gguf, tiny_gguf_other):  # type: ignore[no-untyped-def]
    """4 simulated devices on v1, a fifth awaiting enrollment, and v2 live at its canary stage."""
    base_url, settings = live_server
    admin, operator = _bearer(_token(engine, Role.admin)), _bearer(_token(engine, Role.operator))
    viewer_token = _token(engine, Role.viewer)
    with httpx.Client(base_url=base_url, timeout=30) as api:
        _seed_registry(api, operator, tiny_gguf, tiny_gguf_other)
        names = [(f"kiosk-{i}", {"region": "eu" if i % 2 else "us", "i": str(i)}) for i in range(4)]
        creds = enroll_devices(api, admin, names)  # type: ignore[arg-type]
        assert api.post("/v1/devices", json={"name": "spare-1", "labels": {"region": "eu"}}, headers=admin).is_success
        behaviour = sim_config(latency_ms=lambda v: LATENCY_MS[v], requests_per_window=10)
        devices = start_sim_devices(MOSQUITTO, Topics(settings.mqtt_topic_prefix), creds, behaviour)
        try:
            with TelemetryPump(devices):
                first = _rollout(api, operator, "1", FAST_PLAN)
                wait_for(lambda: _rollout_state(api, operator, first["id"])["state"] == "completed", what="v1 rollout")
                live = _rollout(api, operator, "2", LIVE_PLAN)
                wait_for(
                    lambda: (
                        (_rollout_state(api, operator, live["id"])["last_evaluation"] or {}).get("result") == "pass"
                    ),
                    timeout_s=60,
                    what="the canary's gates to pass",
                )
                yield {"base_url": base_url, "api": api, "operator": operator, "viewer_token": viewer_token,
                       "rollout": live, "devices": devices}  # fmt: skip
        finally:
            for device in devices:
                device.stop()


def _sign_in(page: Any, base_url: str, path: str, token: str) -> None:
    page.goto(base_url + path)
    assert "/login" in page.url  # no cookie yet: the dashboard asks for a token
    page.fill("#token", "slm_not-a-real-token")
    page.click("#login-form button[type=submit]")
    assert "unknown or revoked" in page.inner_text("[role=alert]")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(base_url + path)


def _path_points(d: str) -> int:
    return d.count("M") + d.count("L")


def test_dashboard_shows_a_live_rollout_in_chromium(fleet_with_live_rollout, tmp_path, tiny_gguf_other):  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    ctx = fleet_with_live_rollout
    base_url, rollout_id = ctx["base_url"], ctx["rollout"]["id"]
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        _sign_in(page, base_url, f"/rollouts/{rollout_id}", ctx["viewer_token"])
        # From here on no console error at all (the wrong token's 401 above is logged by Chromium).
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
        cookie = next(c for c in page.context.cookies() if c["name"] == "slmops_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        _check_canary(page)
        _check_charts(page)
        _promote_and_follow(page, ctx["api"], ctx["operator"], rollout_id, tmp_path)
        _check_overview(page, base_url, ctx["devices"], tmp_path)
        _check_devices(page, base_url, tmp_path)
        _check_registry(page, base_url, hashlib.sha256(tiny_gguf_other.read_bytes()).hexdigest(), tmp_path)
        _check_rollouts_and_telemetry(page, base_url, rollout_id)
        browser.close()
    assert not problems, problems


def _check_canary(page: Any) -> None:
    """State, stage, devices per state and the last evaluation's numbers; then a live update."""
    assert page.get_attribute("#rollout-state", "data-state") == "running"
    assert page.inner_text("#rollout-stage") == "canary"
    assert page.inner_text("#device-states .count-active b") == "1"
    assert page.inner_text("#device-states .count-waiting b") == "3"
    ratio = page.locator("#gate-checks tr[data-gate=max_p95_latency_ratio]")
    assert ratio.get_attribute("data-result") == "pass"
    assert ratio.locator("[data-limit]").inner_text() == "1.5"
    assert 0.2 < float(ratio.locator("[data-value]").inner_text()) < 0.9  # v2 is about twice as fast
    rss = page.locator("#gate-checks tr[data-gate=max_rss_mb]")
    assert float(rss.locator("[data-value]").inner_text()) == pytest.approx(120.0)
    assert rss.locator("[data-limit]").inner_text() == "512"
    # Live: the evaluation count grows without a reload.
    seen = int(page.get_attribute("#evaluation-count", "data-count") or 0)
    assert seen >= 1
    page.wait_for_function(
        "n => Number(document.querySelector('#evaluation-count').dataset.count) > n", arg=seen, timeout=15000
    )


def _check_charts(page: Any) -> None:
    """An SVG path per version with several points: v1 before the rollout, v2 on the canary."""
    page.wait_for_selector("#chart-p95 svg path.series[data-series='tiny@2']", state="attached", timeout=25000)
    page.wait_for_function(
        "() => (document.querySelector(\"#chart-p95 path[data-series='tiny@2']\").getAttribute('d')"
        ".match(/L/g) || []).length >= 2",
        timeout=25000,
    )
    for name in ("tiny@1", "tiny@2"):
        d = page.get_attribute(f"#chart-p95 path[data-series='{name}']", "d") or ""
        assert _path_points(d) >= 3, d
    assert page.locator("#chart-rss svg path.series").count() == 2


def _promote_and_follow(
    page: Any, api: httpx.Client, operator: dict[str, str], rollout_id: str, tmp_path: Path
) -> None:
    """An operator promotes through the API; the open page follows by itself. Then the screenshot."""
    promoted = api.post(f"/v1/rollouts/{rollout_id}/promote", headers=operator)
    assert promoted.status_code == 200, promoted.text
    page.wait_for_function("() => document.querySelector('#rollout-stage').textContent === 'fleet'", timeout=15000)
    page.wait_for_function(
        "() => (document.querySelector('#device-states .count-active b') || {}).textContent === '4'",
        timeout=30000,
    )
    page.reload()  # charts refresh every 10 s; a reload draws them with the fleet stage at once
    page.wait_for_selector("#chart-p95 svg path.series[data-series='tiny@2']", state="attached")
    shot = tmp_path / "dashboard-rollout.png"
    page.screenshot(path=str(shot), full_page=True)
    SHOWCASE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SHOWCASE)
    assert shot.stat().st_size > 10_000


def _check_overview(page: Any, base_url: str, devices: list[SimDevice], tmp_path: Path) -> None:
    page.goto(base_url + "/")
    assert page.inner_text("#stat-total") == "5"
    assert page.inner_text("#stat-online") == "4"
    assert page.inner_text("#stat-pending") == "1"
    assert page.inner_text("#stat-offline") == "0"
    assert page.inner_text("#by-version tr[data-version='tiny@2'] [data-count]") == "4"
    assert "tiny@2" in page.inner_text("#active-rollouts")
    page.wait_for_selector("#chart-rss svg path.series", state="attached")
    page.screenshot(path=str(tmp_path / "dashboard-overview.png"), full_page=True)
    devices[0].stop()  # its last will marks it offline; the open overview follows
    page.wait_for_function("() => document.querySelector('#stat-offline').textContent === '1'", timeout=15000)
    assert page.inner_text("#stat-online") == "3"
    assert "kiosk-" in page.inner_text("#offline")


def _check_devices(page: Any, base_url: str, tmp_path: Path) -> None:
    page.goto(base_url + "/devices")
    assert page.locator("#devices-table tbody tr[data-device]").count() == 5
    page.fill("#device-filters input[name=selector]", "region=eu")
    page.select_option("#device-filters select[name=status]", "online")
    page.click("#device-filters button[type=submit]")
    page.wait_for_url("**/devices?selector=region%3Deu&status=online**")
    shown = page.locator("#devices-table tbody tr[data-device]")
    names = sorted(shown.nth(i).get_attribute("data-device") for i in range(shown.count()))
    # kiosk-1 and kiosk-3 are in eu; spare-1 is too but never enrolled; one kiosk may be the one stopped.
    assert names == ["kiosk-1", "kiosk-3"], names
    page.screenshot(path=str(tmp_path / "dashboard-devices.png"), full_page=True)
    page.goto(base_url + "/devices?selector=not%20a%20selector!")
    assert "cannot parse selector" in page.inner_text("#filter-error")


def _check_registry(page: Any, base_url: str, v2_sha256: str, tmp_path: Path) -> None:
    page.goto(base_url + "/registry")
    v2 = page.locator("[data-model=tiny] [data-version='2']")
    assert v2.locator("code.sha").inner_text() == v2_sha256
    assert "finetuned from tiny@1" in v2.locator(".lineage").inner_text()
    assert "perplexity = 12.5" in v2.locator(".metrics").inner_text()
    assert "gguf" in v2.locator("table.artifacts").inner_text()
    page.screenshot(path=str(tmp_path / "dashboard-registry.png"), full_page=True)


def _check_rollouts_and_telemetry(page: Any, base_url: str, rollout_id: str) -> None:
    page.goto(base_url + "/rollouts")
    rows = page.locator("#rollouts-table tbody tr")
    assert rows.count() == 2
    assert "running" in rows.nth(0).inner_text() and "completed" in rows.nth(1).inner_text()
    page.click(f"#rollouts-table a[href='/rollouts/{rollout_id}']")
    page.wait_for_url(f"**/rollouts/{rollout_id}")
    page.goto(base_url + "/telemetry?range=5m")
    for chart in ("#chart-p95", "#chart-rss", "#chart-requests"):
        page.wait_for_selector(f"{chart} svg path.series[data-series='tiny@2']", state="attached")
    assert "tiny@1" in page.inner_text("#chart-p95 .legend")
