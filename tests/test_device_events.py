"""Device events (download errors among them) over `/v1/devices/{id}/events`, `/v1/events` and the dashboard."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from control_plane.fleet.subscriber import DeviceMessage
from control_plane.models import Role, utcnow
from control_plane.services import auth
from shared.messages import EventMessage
from shared.topics import TopicKind
from tests.support.telemetry import add_devices, ingest


def _event(device_id: str, kind: str, message: str = "", **fields: object) -> DeviceMessage:
    body = EventMessage(kind=kind, model="m", version="2", message=message, **fields)  # type: ignore[arg-type]
    return DeviceMessage(device_id, TopicKind.EVENTS, body, "test/events", datetime.now(UTC))


def _kinds(response: object) -> list[str]:
    body = response.json()  # type: ignore[attr-defined]
    return [e["kind"] for e in body["data"]]


def _fleet(engine: sa.Engine) -> tuple[str, str, datetime]:
    """Two devices' events, each ingested on its own (a batch stores its events under one time)."""
    a, b = add_devices(engine, "events-a", "events-b")
    for message in (
        _event(a, "download_started"),
        _event(a, "download_failed", "redirect refused: downgrade", detail={"code": "redirect_refused"}),
        _event(b, "activation_failed", "<script>alert(1)</script>"),
    ):
        ingest(engine, [message])
    between = utcnow()
    ingest(engine, [_event(a, "download_started")])
    ingest(engine, [_event(a, "download_completed", bytes_done=10, bytes_total=10)])
    return a, b, between


def test_a_devices_events_are_listed_filtered_and_paged(client: TestClient, viewer_headers, engine) -> None:  # type: ignore[no-untyped-def]
    a, b, between = _fleet(engine)
    listed = client.get(f"/v1/devices/{a}/events", headers=viewer_headers)
    assert listed.status_code == 200, listed.text
    assert _kinds(listed) == ["download_started", "download_failed", "download_started", "download_completed"]
    failed = listed.json()["data"][1]
    assert failed["device_id"] == a and failed["detail"]["detail"] == {"code": "redirect_refused"}
    assert failed["detail"]["message"] == "redirect refused: downgrade" and failed["created_at"].endswith("Z")

    by_name = client.get("/v1/devices/events-a/events", params={"type": "download_failed"}, headers=viewer_headers)
    assert _kinds(by_name) == ["download_failed"]
    since = client.get(f"/v1/devices/{a}/events", params={"since": between.isoformat()}, headers=viewer_headers)
    assert _kinds(since) == ["download_started", "download_completed"]

    pages, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/devices/{a}/events", params=params, headers=viewer_headers).json()
        pages.append([e["kind"] for e in page["data"]])
        if not (cursor := page["next_cursor"]):
            break
    assert pages == [["download_started", "download_failed", "download_started"], ["download_completed"]]
    assert _kinds(client.get(f"/v1/devices/{b}/events", headers=viewer_headers)) == ["activation_failed"]


def test_fleet_events_filter_by_device_type_and_time(client: TestClient, viewer_headers, engine) -> None:  # type: ignore[no-untyped-def]
    a, b, between = _fleet(engine)
    everything = client.get("/v1/events", headers=viewer_headers)
    assert everything.status_code == 200 and len(everything.json()["data"]) == 5
    assert {e["device_id"] for e in everything.json()["data"]} == {a, b}
    failures = client.get("/v1/events", params={"type": "activation_failed"}, headers=viewer_headers)
    assert [(e["device_id"], e["kind"]) for e in failures.json()["data"]] == [(b, "activation_failed")]
    one = client.get("/v1/events", params={"device": "events-a", "since": between.isoformat()}, headers=viewer_headers)
    assert _kinds(one) == ["download_started", "download_completed"]
    ancient = client.get("/v1/events", params={"since": "0001-01-01T00:00:00Z"}, headers=viewer_headers)
    assert ancient.status_code == 200 and len(ancient.json()["data"]) == 5
    # Any offset means the same instant; the calendar's ends stay in range.
    east = between.astimezone(timezone(timedelta(hours=14))).isoformat()
    assert _kinds(client.get("/v1/events", params={"since": east}, headers=viewer_headers)) == [
        "download_started",
        "download_completed",
    ]
    for edge, count in (("0001-01-01T00:00:00+14:00", 5), ("9999-12-31T23:59:59-14:00", 0)):
        response = client.get("/v1/events", params={"since": edge}, headers=viewer_headers)
        assert response.status_code == 200 and len(response.json()["data"]) == count, response.text


def test_event_queries_refuse_bad_input_and_other_principals(
    client: TestClient, viewer_headers, admin_headers, engine
) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = _fleet(engine)
    for path in ("/v1/devices/nope/events", "/v1/events?device=nope"):
        missing = client.get(path, headers=viewer_headers)
        assert missing.status_code == 404 and missing.json()["code"] == "device_not_found"
    for params in ({"type": "not_a_kind"}, {"since": "yesterday"}, {"limit": 0}, {"limit": 501}):
        bad = client.get("/v1/events", params=params, headers=viewer_headers)
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error", params
    assert client.get("/v1/events", params={"cursor": "garbage"}, headers=viewer_headers).json()["code"] == (
        "validation_error"
    )
    assert client.get(f"/v1/devices/{a}/events").status_code == 401
    created = client.post("/v1/devices", json={"name": "events-c"}, headers=admin_headers).json()
    enrolled = client.post(
        "/v1/devices/enroll", json={"enrollment_token": created["enrollment_token"], "hardware": {"ram_mb": 1024}}
    ).json()
    device = base64.b64encode(f"{enrolled['device_id']}:{enrolled['device_secret']}".encode()).decode()
    as_device = client.get("/v1/events", headers={"Authorization": f"Basic {device}"})
    assert as_device.status_code == 403 and as_device.json()["code"] == "forbidden"  # not even its own: viewers read


def test_the_devices_page_shows_the_latest_events(client: TestClient, engine) -> None:  # type: ignore[no-untyped-def]
    _fleet(engine)
    with Session(engine) as session:
        _, token = auth.create_token(session, name="events-viewer", role=Role.viewer)
        session.commit()
    assert (
        client.post(
            "/login",
            data={"token": token, "next": "/"},
            follow_redirects=False,
            headers={"Origin": "http://testserver"},
        ).status_code
        == 303
    )
    page = client.get("/devices")
    assert page.status_code == 200
    table = page.text.split('id="events-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr data-event=") == 5
    assert table.index('data-event="download_completed"') < table.index('data-event="download_failed"')  # newest first
    assert "redirect refused: downgrade" in table and "m@2" in table
    assert "<script>alert(1)</script>" not in table and "&lt;script&gt;" in table
    only_b = client.get("/devices", params={"selector": "", "status": "", "version": ""}).text
    assert "events-b" in only_b
