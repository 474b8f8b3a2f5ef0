"""One-time enrollment tokens are claimed atomically; secrets never rest in idempotency records."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.errors import DomainError
from control_plane.models import AuditEntry, IdempotencyRecord, Role
from control_plane.services import auth, devices
from shared.enrollment import EnrollRequest


def _lock_waiters(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        return int(conn.execute(sa.text(query)).scalar_one())


def test_two_enrollments_racing_for_one_token_give_one_credential(empty_tables: sa.Engine, db_url: str) -> None:
    """The second enrollment waits on the first's row lock, then must find the token used."""
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks between sessions: PostgreSQL (SQLite has a single writer)")
    engine = empty_tables
    with Session(engine) as session:
        device, token = devices.create_device(session, name="racer", labels={}, created_by="t", token_ttl_s=600)
        session.commit()
    request = EnrollRequest(enrollment_token=token)
    first = Session(engine)
    devices.enroll(first, request)  # claimed, not yet committed: the row is locked
    outcome: list[str] = []

    def second() -> None:
        with Session(engine) as session:
            try:
                devices.enroll(session, request)
                session.commit()
                outcome.append("enrolled")
            except DomainError as exc:
                outcome.append(exc.code)

    racer = threading.Thread(target=second)
    racer.start()
    deadline = time.monotonic() + 20
    while _lock_waiters(engine) == 0 and racer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    first.commit()
    first.close()
    racer.join(timeout=20)
    assert outcome == ["enrollment_token_used"]


def _records(engine: sa.Engine) -> list[IdempotencyRecord]:
    with Session(engine) as session:
        return list(session.exec(select(IdempotencyRecord)).all())


@pytest.mark.parametrize(
    ("path", "body", "secret_field", "prefix"),
    [
        ("/v1/tokens", {"name": "ci", "role": "viewer"}, "token", "slm_"),
        ("/v1/devices", {"name": "kiosk-9"}, "enrollment_token", "enr_"),
    ],
)
def test_an_idempotent_replay_never_keeps_the_secret(  # type: ignore[no-untyped-def]
    client: TestClient, admin_headers, engine: sa.Engine, path: str, body: dict, secret_field: str, prefix: str
) -> None:
    headers = {**admin_headers, "Idempotency-Key": "k-1"}
    created = client.post(path, json=body, headers=headers)
    assert created.status_code == 201 and created.json()[secret_field].startswith(prefix)
    (record,) = _records(engine)
    assert created.json()[secret_field] not in str(record.response) and record.response[secret_field] is None
    replay = client.post(path, json=body, headers=headers)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == created.json()["id"] and replay.json()[secret_field] is None


def test_idempotency_keys_and_audit_entries_belong_to_one_token(client: TestClient, engine: sa.Engine) -> None:
    """Two admin tokens with the same name neither share keys nor look alike in the audit trail."""
    with Session(engine) as session:
        first, first_plain = auth.create_token(session, name="ops", role=Role.admin)
        second, second_plain = auth.create_token(session, name="ops", role=Role.admin)
        ids = [first.id, second.id]
        session.commit()
    for plain, model in ((first_plain, "alpha"), (second_plain, "beta")):
        headers = {"Authorization": f"Bearer {plain}", "Idempotency-Key": "same-key"}
        response = client.post("/v1/models", json={"name": model}, headers=headers)
        assert response.status_code == 201, response.text
        assert response.json()["name"] == model
    with Session(engine) as session:
        entries = session.exec(select(AuditEntry).where(AuditEntry.action == "model.create")).all()
    assert sorted(e.actor_id for e in entries) == sorted(ids)
    audit = client.get("/v1/audit", headers={"Authorization": f"Bearer {first_plain}"}).json()["data"]
    assert {e["actor_id"] for e in audit if e["action"] == "model.create"} == set(ids)
