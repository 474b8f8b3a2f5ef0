"""Helpers for the lifecycle tests: devices with labels, versions by reference, controller ticks."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from control_plane.models import AuditEntry, DesiredStateRow
from control_plane.rollouts.controller import RolloutController

HARDWARE = {"ram_mb": 4096, "arch": "x86_64"}
NO_WAIT = {"min_samples": 1, "max_p95_latency_ratio": None, "warmup_windows": 0}


def enrolled_device(client: TestClient, admin: dict[str, str], name: str, **labels: str) -> dict[str, str]:
    """{"device_id", "device_secret", ...} of a new enrolled device."""
    created = client.post("/v1/devices", json={"name": name, "labels": labels}, headers=admin)
    assert created.status_code == 201, created.text
    enrolled = client.post(
        "/v1/devices/enroll", json={"enrollment_token": created.json()["enrollment_token"], "hardware": HARDWARE}
    )
    assert enrolled.status_code == 201, enrolled.text
    return enrolled.json()  # type: ignore[no-any-return]


def referenced_version(client: TestClient, op: dict[str, str], model: str, version: str, sha_char: str) -> None:
    artifact = {
        "url": f"https://models.example/{sha_char}.gguf",
        "sha256": sha_char * 64,
        "size_bytes": 1000,
        "format": "gguf",
    }
    r = client.post(f"/v1/models/{model}/versions", json={"version": version, "artifact": artifact}, headers=op)
    assert r.status_code == 201, r.text


def tick(engine, controller: RolloutController | None = None) -> None:  # type: ignore[no-untyped-def]
    with Session(engine, expire_on_commit=False) as session:
        (controller or RolloutController()).tick(session)


def desired_version(engine, device_id: str) -> str | None:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        row = session.get(DesiredStateRow, device_id)
        return None if row is None or row.unload else row.version


def audit_actions(engine, action: str) -> list[AuditEntry]:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        # In the order they were written (a heap-ordered table returns rows in any order).
        stmt = select(AuditEntry).where(AuditEntry.action == action).order_by(col(AuditEntry.created_at))
        return list(session.exec(stmt).all())
