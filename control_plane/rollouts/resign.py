"""Freshness: desired states whose release is in the last half of its life get a re-signed one.

Each distinct release is signed once (a higher serial, a new expiry, the same artifacts), however
many devices name it; the rows are locked while read so a concurrent assignment is never undone.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, select

from control_plane.models import DesiredStateRow
from control_plane.rollouts import assign
from control_plane.trust.releases import ReleaseSigner
from shared.desired import DesiredState
from shared.signing import SignedMetadata

log = logging.getLogger("slmops.releases")


def resign_due(session: Session, signer: ReleaseSigner, *, now: datetime | None = None) -> int:
    """Re-sign the releases of desired states that expire within half a release's life; returns
    how many desired states were rewritten (the caller commits, the publisher sends them)."""
    table = DesiredStateRow.__table__  # type: ignore[attr-defined]
    cutoff = (now or datetime.now(UTC)) + timedelta(seconds=signer.expiry_s / 2)
    expires = table.c.payload[("release", "signed", "expires")].as_string()
    stmt = select(table.c.device_id, table.c.payload).where(expires < cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"))
    rows = session.execute(stmt.with_for_update()).all()
    fresh: dict[tuple[str, int], SignedMetadata] = {}
    states: dict[str, dict[str, Any]] = {}
    for device_id, payload in rows:
        state = DesiredState.model_validate(payload)
        assert state.release is not None  # the filter matched its expiry
        key = (state.model, int(state.release.signed["serial"]))
        if key not in fresh:
            fresh[key] = signer.resign(state, rollout_id=state.rollout_id, unload=state.unload).release  # type: ignore[assignment]
        renewed = state.model_copy(update={"release": fresh[key], "roots": signer.rotations})
        states[device_id] = assign.with_message_id(renewed.model_dump(mode="json"))
    assign.write_desired(session, states)
    if states:
        log.info("re-signed %d release(s) for %d device(s) before they expire", len(fresh), len(states))
    return len(states)
