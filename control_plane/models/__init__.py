"""All tables; importing this module fills `SQLModel.metadata` for alembic and the app."""

from control_plane.models.auth import ApiToken, AuditEntry, DashboardSession, IdempotencyRecord, Role
from control_plane.models.base import as_utc, new_id, utcnow
from control_plane.models.devices import Device, DeviceLabel, DeviceStatus
from control_plane.models.jobs import Job
from control_plane.models.registry import (
    DEPLOYABLE_STATUSES,
    Artifact,
    ArtifactFormat,
    LineageRelation,
    Model,
    ModelVersion,
    VersionStatus,
)
from control_plane.models.rollouts import (
    ACTIVE_STATES,
    DesiredStateRow,
    GateEvaluation,
    Rollout,
    RolloutDevice,
    RolloutState,
)
from control_plane.models.telemetry import DeviceEvent, TelemetryRecord
from control_plane.telemetry.tables import DeviceRollup, RollupState, VersionRollup

__all__ = [
    "ACTIVE_STATES",
    "DesiredStateRow",
    "DeviceEvent",
    "GateEvaluation",
    "Rollout",
    "RolloutDevice",
    "RolloutState",
    "TelemetryRecord",
    "DeviceRollup",
    "RollupState",
    "VersionRollup",
    "ApiToken",
    "Artifact",
    "ArtifactFormat",
    "AuditEntry",
    "DashboardSession",
    "Device",
    "DeviceLabel",
    "DeviceStatus",
    "IdempotencyRecord",
    "Job",
    "LineageRelation",
    "Model",
    "ModelVersion",
    "Role",
    "VersionStatus",
    "DEPLOYABLE_STATUSES",
    "as_utc",
    "new_id",
    "utcnow",
]
