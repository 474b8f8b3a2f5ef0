"""REST request and response bodies (the public shapes; tables live in control_plane.models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from control_plane.models.base import as_utc

T = TypeVar("T")
# SQLite returns naive datetimes; every stored timestamp is UTC, so the API always says so.
UTCDatetime = Annotated[datetime, AfterValidator(as_utc)]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


class ModelCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2000)
    task: str = Field(default="text-generation", max_length=64)
    keep_versions: int | None = Field(default=None, ge=1, le=10000, description="retention: newest N versions")


class ModelUpdate(BaseModel):
    """PATCH body: only the fields given change; `keep_versions: null` keeps every version."""

    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(default=None, max_length=2000)
    keep_versions: int | None = Field(default=None, ge=1, le=10000)


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    description: str
    task: str
    keep_versions: int | None = None
    created_by: str
    created_at: UTCDatetime


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    format: str
    quantization: str | None
    size_bytes: int
    sha256: str
    storage_key: str | None
    external_url: str | None
    download_url: str
    runtime_hints: dict[str, Any]
    min_ram_mb: int
    accelerators: list[str]
    cpu_arch: list[str]
    file_metadata: dict[str, Any]
    eval_metrics: dict[str, Any]
    created_at: UTCDatetime
    deduplicated: bool | None = None  # set on upload responses only


class LineagePublic(BaseModel):
    model: str
    version: str
    relation: str | None


class VersionPublic(BaseModel):
    id: str
    model: str
    version: str
    status: str
    created_by: str
    notes: str
    eval_metrics: dict[str, Any]
    provenance: dict[str, Any]
    parent: LineagePublic | None
    artifacts: list[ArtifactPublic]
    created_at: UTCDatetime


class ArtifactSpec(BaseModel):
    """Metadata an operator declares next to an uploaded file (multipart fields) or a reference."""

    format: Literal["gguf", "onnx", "onnx-tar", "gguf-lora"] | None = None
    quantization: str | None = Field(default=None, max_length=32)
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    min_ram_mb: int = Field(default=0, ge=0)
    accelerators: list[str] = Field(default_factory=list)
    cpu_arch: list[str] = Field(default_factory=list)
    runtime_hints: dict[str, Any] = Field(default_factory=dict)


class ArtifactReference(ArtifactSpec):
    """An artifact that lives elsewhere (https://; s3:// is refused for now): sha256 and size are mandatory.

    The URL may hold no credentials nor name a loopback, link-local or private host unless
    SLMOPS_ARTIFACT_REFERENCE_ALLOWED_HOSTS lists it (422 `invalid_reference`).
    """

    url: str = Field(pattern=r"^(https|s3)://.+", max_length=2000)
    sha256: str = Field(pattern=SHA256_PATTERN)  # type: ignore[assignment]
    size_bytes: int = Field(gt=0)
    format: Literal["gguf", "onnx", "onnx-tar", "gguf-lora"]  # type: ignore[assignment]


class VersionSpec(BaseModel):
    version: str = Field(pattern=VERSION_PATTERN)
    notes: str = Field(default="", max_length=4000)
    eval_metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = Field(default=None, description="'version' of this model or 'model@version'")
    relation: Literal["quantized_from", "distilled_from", "finetuned_from", "adapter_of"] | None = None


class VersionByReference(VersionSpec):
    artifact: ArtifactReference


class VersionStatusUpdate(BaseModel):
    """`deprecated`: no new rollout may target it. `recalled`: every device is rolled off it to the
    newest good version of the model, by a rollout the control plane starts itself."""

    status: Literal["registered", "validated", "deprecated", "revoked", "recalled"]


class GcResult(BaseModel):
    dry_run: bool
    versions: list[str]  # model@version deleted by retention policies
    blobs: list[dict[str, Any]]  # {sha256, size_bytes}
    bytes_freed: int


# The selector grammar's own key and value shapes (control_plane.services.selectors), so every label can be selected.
LABEL_KEY_PATTERN = r"^[A-Za-z0-9._/-]{1,63}$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._/+-]{0,63}$"  # "/" and "+": IANA timezones, e.g. tz=Europe/Stockholm
MAX_LABELS = 64
Labels = Annotated[
    dict[Annotated[str, Field(pattern=LABEL_KEY_PATTERN)], Annotated[str, Field(pattern=LABEL_VALUE_PATTERN)]],
    Field(max_length=MAX_LABELS),
    # pydantic states key patterns as patternProperties, which lets any other key through.
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": LABEL_KEY_PATTERN},
            "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_PATTERN},
            "maxProperties": MAX_LABELS,
        }
    ),
]


class DeviceCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    labels: Labels = Field(default_factory=dict)


class DeviceUpdate(BaseModel):
    """PATCH body: only the fields given change; `labels` replaces the whole set."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    labels: Labels | None = None


class DeviceRelabel(BaseModel):
    """Bulk relabel: every device the selector matches gets `set` and loses `remove`."""

    model_config = ConfigDict(extra="forbid")
    selector: str = Field(min_length=1, max_length=500, description="label selector; required")
    set: Labels = Field(default_factory=dict)
    remove: list[Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]] = Field(default_factory=list, max_length=MAX_LABELS)


class RotationRequest(BaseModel):
    grace_s: int = Field(default=3600, ge=0, le=7 * 86400, description="how long the old secret keeps working")


class RelabelResult(BaseModel):
    selector: str
    matched: int
    set: dict[str, str]
    remove: list[str]


class DevicePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    status: str
    labels: dict[str, str]
    hardware: dict[str, Any]
    last_seen: UTCDatetime | None
    enrolled_at: UTCDatetime | None
    current_model: str | None
    current_version: str | None
    current_sha256: str | None
    rotation_requested_at: UTCDatetime | None = None  # the device should fetch a new secret
    created_at: UTCDatetime


class DeviceCreated(DevicePublic):
    enrollment_token: str | None = Field(description="one-time token, in this response only; null in a replay")
    enrollment_expires_at: UTCDatetime


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    role: Literal["viewer", "operator", "admin"]


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    role: str
    prefix: str
    created_by: str
    created_at: UTCDatetime
    last_used_at: UTCDatetime | None
    revoked_at: UTCDatetime | None


class TokenCreated(TokenPublic):
    token: str | None = Field(description="the plaintext, in this response only; null in an idempotent replay")


class AuditPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    actor: str
    actor_id: str
    action: str
    target: str
    request_id: str
    detail: dict[str, Any]
    created_at: UTCDatetime


class DeviceEventPublic(BaseModel):
    """An event a device reported (download, activation, rollback, ...); `detail` is the message as sent."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    device_id: str
    message_id: str | None
    kind: str
    detail: dict[str, Any]
    created_at: UTCDatetime
