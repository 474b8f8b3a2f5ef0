"""Request bodies are capped and never read before authentication; failed credentials are rate limited."""

from __future__ import annotations

import socket
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from control_plane.config import Settings
from tests.support.server_thread import ServerThread

MIB = 1024 * 1024
BIG = 64 * MIB  # what an attacker streams; the server must neither read nor hold it


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        max_upload_bytes=20 * MIB,
        fleet_enabled=False,
        rate_limit_auth_failures_per_min=3,
        rate_limit_enroll_failures_per_min=2,
        rate_limit_login_failures_per_min=2,
    )


class StreamedBody:
    """An ASGI request body made on demand, 1 MiB a message, counting how much the app pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def receive(self) -> dict[str, Any]:
        size = min(MIB, self.total - self.pulled)
        self.pulled += size
        return {"type": "http.request", "body": b"x" * size, "more_body": self.pulled < self.total}


async def _call(app: Any, path: str, body: StreamedBody, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    import json

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000), "server": ("testserver", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, body.receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload)


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("path", "headers", "status", "code", "most_pulled"),
    [
        # No credential: refused before a byte of the body is read, declared length or not.
        ("/v1/models", JSON, 401, "unauthenticated", 0),
        ("/v1/models", {**JSON, "content-length": str(BIG)}, 401, "unauthenticated", 0),
        ("/v1/models/m/versions", {"content-type": "multipart/form-data; boundary=x"}, 401, "unauthenticated", 0),
        # Enrollment has no credential to check first: its body is capped (1 MiB) instead.
        ("/v1/devices/enroll", {**JSON, "content-length": str(BIG)}, 413, "payload_too_large", 0),
        ("/v1/devices/enroll", JSON, 413, "payload_too_large", 2 * MIB),
    ],
)
async def test_a_large_body_is_refused_unread(  # type: ignore[no-untyped-def]
    app, path: str, headers: dict[str, str], status: int, code: str, most_pulled: int
) -> None:
    body = StreamedBody(BIG)
    tracemalloc.start()
    try:
        answered, problem = await _call(app, path, body, headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (answered, problem["code"]) == (status, code)
    assert body.pulled <= most_pulled
    assert peak < 8 * MIB  # nothing the size of the body was ever held


async def test_an_operator_json_body_is_capped_too(app, admin_headers) -> None:  # type: ignore[no-untyped-def]
    body = StreamedBody(BIG)
    status, problem = await _call(app, "/v1/models", body, {**JSON, **admin_headers})
    assert status == 413 and problem["code"] == "payload_too_large" and problem["limit_bytes"] == MIB
    assert body.pulled <= 2 * MIB


def test_the_client_gets_its_401_while_still_sending(app) -> None:  # type: ignore[no-untyped-def]
    """Over a real socket: the answer comes back after the headers, with 200 MiB still unsent."""
    with ServerThread(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        head = (
            "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * MIB}\r\n\r\n"
        )
        conn.sendall(head.encode() + b"{" * 65536)
        answer = conn.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 401"), answer[:200]


def test_bearer_failures_are_rate_limited_per_address(client: TestClient, viewer_headers) -> None:  # type: ignore[no-untyped-def]
    for _ in range(10):  # a valid credential never takes from the bucket
        assert client.get("/v1/models", headers=viewer_headers).status_code == 200
    bad = {"Authorization": "Bearer slm_guess"}
    assert [client.get("/v1/models", headers=bad).status_code for _ in range(3)] == [401, 401, 401]
    refused = client.get("/v1/models", headers=bad)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"].startswith("application/problem+json")
    # Once the bucket is empty no guess is checked at all, a right one included.
    assert client.get("/v1/models", headers=viewer_headers).status_code == 429


def test_enrollment_failures_are_rate_limited(client: TestClient) -> None:
    guess = {"enrollment_token": "enr_guessing-a-token", "hardware": {}}
    assert [client.post("/v1/devices/enroll", json=guess).status_code for _ in range(2)] == [401, 401]
    refused = client.post("/v1/devices/enroll", json=guess)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited" and "retry-after" in refused.headers


def test_login_failures_are_rate_limited(client: TestClient) -> None:
    form = {"token": "slm_guess", "next": "/"}
    origin = {"Origin": "http://testserver"}
    statuses = [client.post("/login", data=form, headers=origin, follow_redirects=False).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]


async def test_a_413_for_a_streamed_body_closes_the_connection(app) -> None:  # type: ignore[no-untyped-def]
    """No Content-Length to refuse up front: the 413 comes once the cap is passed, and says
    `Connection: close`, so the server stops reading instead of draining the rest of the body."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/devices/enroll", "raw_path": b"/v1/devices/enroll", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 40000), "server": ("x", 80),
    }  # fmt: skip
    await app(scope, StreamedBody(BIG).receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert (b"connection", b"close") in start["headers"]


def test_the_server_stops_reading_a_streamed_body_over_the_cap(app) -> None:  # type: ignore[no-untyped-def]
    head = b"POST /v1/devices/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % (64 * 1024) + b"a" * (64 * 1024) + b"\r\n"
    with ServerThread(app) as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        try:
            conn.sendall(head + chunk * 24)  # 1.5 MiB of a body that never ends
            while conn.recv(65536):
                pass
            closed = True  # the server closed the connection after its answer
        except ConnectionResetError:
            closed = True  # closed with the rest of the body unread
        except TimeoutError:
            closed = False  # still waiting for the rest of the body
    assert closed
