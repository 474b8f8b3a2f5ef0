"""Which artifacts a device may download: those of versions the control plane has assigned it."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session

from control_plane.models import DesiredStateRow, RolloutDevice


def device_may_fetch(session: Session, device_id: str, sha256: str) -> bool:
    """Whether `sha256` is in the device's desired state or in the one that desired state replaced.

    The replaced one is what a rollback restores, so a device can always fetch its way back.
    """
    return sha256 in assigned_artifacts(session, device_id)


def assigned_artifacts(session: Session, device_id: str) -> set[str]:
    """The sha256 of every artifact (adapters included) of the device's current and previous assignment."""
    desired = session.get(DesiredStateRow, device_id)
    if desired is None:
        return set()
    shas = {desired.artifact_sha256, *_payload_artifacts(desired.payload)}
    if desired.rollout_id:  # the rollout kept what this assignment replaced (primary-key lookup)
        member = session.get(RolloutDevice, (desired.rollout_id, device_id))
        if member is not None:
            shas |= _payload_artifacts(member.previous_desired)
            if member.artifact_sha256:
                shas.add(member.artifact_sha256)
    return shas


def _payload_artifacts(payload: dict[str, Any] | None) -> set[str]:
    """The artifact and adapter sha256 a DesiredState (as JSON) names."""
    payload = payload or {}
    refs = (payload.get("artifact"), payload.get("adapter"))
    return {str(ref["sha256"]) for ref in refs if isinstance(ref, dict) and ref.get("sha256")}
