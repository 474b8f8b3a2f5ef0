"""Dashboard actions in headless Chromium: promote and abort a rollout with the buttons (after the
confirmation), and a forged POST from a page on another origin changes nothing."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from control_plane.models import Role
from shared.net import free_port
from tests.support.lifecycle import NO_WAIT, enrolled_device, referenced_version
from tests.test_dashboard_browser import CHROMIUM, _bearer, _launch, _token, live_server  # noqa: F401

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
PLAN = {
    "stages": [{"name": "canary", "count": 1, "min_bake_s": 3600}, {"name": "fleet", "percent": 100, "min_bake_s": 0}],
    "gates": NO_WAIT,
}


class _Attacker(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        page = (
            f'<form id="f" method="post" action="{self.target}"></form>'
            "<script>document.getElementById('f').submit()</script>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *_: object) -> None:
        pass


def _attacker_site(target: str) -> Iterator[str]:
    handler = type("Attacker", (_Attacker,), {"target": target})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture
def live_rollout(live_server, engine) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]  # noqa: F811
    base_url, _ = live_server
    admin, operator = _bearer(_token(engine, Role.admin)), _bearer(_token(engine, Role.operator))
    with httpx.Client(base_url=base_url, timeout=30) as api:
        api.post("/v1/models", json={"name": "m"}, headers=operator)
        referenced_version(api, operator, "m", "1", "a")  # type: ignore[arg-type]
        for name in ("kiosk-1", "kiosk-2"):
            enrolled_device(api, admin, name)  # type: ignore[arg-type]
        rollout = api.post("/v1/rollouts", json={"model": "m", "version": "1", **PLAN}, headers=operator).json()
        yield {"base_url": base_url, "api": api, "operator": operator, "rollout": rollout,
               "operator_token": operator["Authorization"].split()[1]}  # fmt: skip


def _state(ctx: dict[str, Any]) -> dict[str, Any]:
    return ctx["api"].get(f"/v1/rollouts/{ctx['rollout']['id']}", headers=ctx["operator"]).json()  # type: ignore[no-any-return]


def test_promote_and_abort_from_the_rollout_page(live_rollout, engine) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    ctx, base_url = live_rollout, live_rollout["base_url"]
    path = f"/rollouts/{ctx['rollout']['id']}"
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        context = browser.new_context()
        page = context.new_page()
        page.goto(base_url + path)
        page.fill("#token", ctx["operator_token"])
        page.click("#login-form button[type=submit]")
        page.wait_for_url(base_url + path)

        # A forged POST from a page on another origin (same site: the Strict cookie goes with it).
        for attacker in _attacker_site(base_url + path + "/actions/abort"):
            forged = context.new_page()
            with forged.expect_response(lambda r: "/actions/abort" in r.url) as answer:
                forged.goto(attacker)
            assert answer.value.status == 403
            forged.close()
        assert _state(ctx)["state"] == "running"

        page.once("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.click("#rollout-actions button[data-action=promote]")
        assert dialogs and "Promote" in dialogs[-1]
        assert _state(ctx)["stage"] == "canary"  # dismissed: nothing happened

        page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        page.click("#rollout-actions button[data-action=promote]")
        page.wait_for_function("() => (document.querySelector('#rollout-stage') || {}).textContent === 'fleet'")
        assert _state(ctx)["stage"] == "fleet"

        page.once("dialog", lambda d: d.accept())
        page.click("#rollout-actions button[data-action=abort]")
        page.wait_for_selector("#rollout-state[data-state=aborted]")
        assert _state(ctx)["state"] == "aborted"
        assert page.locator("#rollout-actions").count() == 0  # nothing left to do
        browser.close()
