"""MQTT message envelopes and the one decoder for every device topic.

Each payload is UTF-8 JSON of a pydantic model that carries `schema_version`; the ones defined
here also carry a `message_id` (so a duplicated QoS 1 delivery is applied once, MQTT 3.1.1
section 4.3.2) and `sent_at`. Per topic kind:

    desired    shared.desired.DesiredState (carries its own message_id)
    state      StateMessage: shared.state.DeviceState plus the envelope
    telemetry  TelemetryMessage: shared.telemetry.TelemetryWindow plus the envelope and the
               count of windows the agent's spool dropped since the last report
    events     EventMessage
    status     StatusMessage

`decode` raises only `MessageDecodeError`, whose `reason` says which of malformed JSON, an
unknown schema version, a failed validation or an unknown kind it was.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationError, field_validator

from shared import SCHEMA_VERSION, limits
from shared.base import WireModel
from shared.desired import DesiredState
from shared.errors import SharedError
from shared.hardware import HardwareProfile
from shared.limits import BigCount, Measure, MessageId, ModelName, Note, Reason, ReportSeq, ShortName, VersionName
from shared.state import DeviceState, GoldenOutcome
from shared.telemetry import TelemetryWindow
from shared.topics import TopicKind

SUPPORTED_SCHEMA_VERSIONS: frozenset[int] = frozenset({SCHEMA_VERSION})

DecodeReason = Literal["malformed_json", "unknown_schema_version", "invalid", "unknown_kind"]


class MessageDecodeError(SharedError, ValueError):
    """A payload that cannot become a typed message; the consumer counts it and drops it."""

    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


def new_message_id() -> str:
    # 128 random bits in hex, as uuid4().hex gives, without building a UUID object per message.
    return secrets.token_hex(16)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(WireModel):
    """Fields every message defined here carries besides `schema_version`."""

    message_id: MessageId = Field(default_factory=new_message_id)
    sent_at: datetime = Field(default_factory=utc_now)


class Ordered(WireModel):
    """`report_seq` orders a device's state and status reports, so that the newest one wins
    whichever replica stores it and in whichever order (optional: older agents send none, and
    their reports are stored as they come).

    It never decreases on a device (shared.report_clock.ReportClock). A state report takes the next value; the
    birth, the will and the shutdown offline of one connection all carry the value taken for
    that connection (the will is fixed at connect time), and offline ranks after online."""

    report_seq: ReportSeq | None = None


class StatusMessage(Ordered, Envelope):
    """Retained on `status`: the birth message says online; the last will says offline."""

    status: Literal["online", "offline"]
    agent_version: ShortName = ""
    hardware: HardwareProfile | None = None  # sent with the birth message
    reason: Note | None = None  # e.g. "connection lost" (will) or "shutdown" (clean stop)


EventKind = Literal[
    "download_started",
    "download_progress",
    "download_completed",
    "download_failed",
    "verification_failed",
    "activation_started",
    "activation_succeeded",
    "activation_failed",
    "rollback",
    "release_verified",  # detail.serial, detail.root_version: the signed release checked before acting
    "release_refused",  # detail.reason: shared.signing.RefusalReason; the device keeps what it served
    "stale_release",  # the served release expired and no newer one came
    "telemetry_dropped",
    "error",
]


class EventMessage(Envelope):
    kind: EventKind
    model: ModelName | None = None
    version: VersionName | None = None
    message: Reason = ""
    detail: dict[str, Any] = Field(default_factory=dict)
    # Download progress; None where it does not apply.
    bytes_done: BigCount | None = None
    bytes_total: BigCount | None = None
    rate_bytes_per_s: Measure | None = None

    @field_validator("detail")
    @classmethod
    def _small_detail(cls, detail: dict[str, Any]) -> dict[str, Any]:
        # Stored as given in a JSON column (orjson writes it): bounded, and what orjson can write.
        try:
            size = len(orjson.dumps(detail))
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"detail cannot be stored as JSON: {exc}") from exc
        if size > limits.MAX_DETAIL_BYTES:
            raise ValueError(f"detail is over {limits.MAX_DETAIL_BYTES} bytes as JSON")
        if "golden" in detail:  # the golden gate counts it: held to the outcome's bounds
            try:
                GoldenOutcome.model_validate(detail["golden"])
            except ValidationError as exc:
                raise ValueError(f"detail.golden: {exc.errors()[0]['msg']}") from exc
        return detail


class StateMessage(DeviceState, Ordered, Envelope):
    """A `DeviceState` as published on `state`."""

    @classmethod
    def wrap(
        cls, state: DeviceState, *, updated_at: datetime | None = None, report_seq: int | None = None
    ) -> StateMessage:
        """`state` as a message; `updated_at` replaces the state's own (saves copying it first)."""
        # `state` is a validated DeviceState: its fields are taken as they are, with no dump and
        # second validation per message (docs/performance.md#fleet-paths). The
        # envelope's fields are given, not defaulted: for a default factory, model_construct
        # inspects the factory's signature every time.
        fields = dict(state)
        if updated_at is not None:
            fields["updated_at"] = updated_at
        return cls.model_construct(**fields, message_id=new_message_id(), sent_at=utc_now(), report_seq=report_seq)


class TelemetryMessage(TelemetryWindow, Envelope):
    """A `TelemetryWindow` as published on `telemetry`."""

    # Windows the agent's spool dropped (oldest first) since the previous report, because the
    # broker was unreachable for longer than the spool holds.
    dropped_windows: BigCount = 0

    @classmethod
    def wrap(cls, window: TelemetryWindow, *, dropped_windows: int = 0) -> TelemetryMessage:
        return cls.model_validate({**window.model_dump(), "dropped_windows": dropped_windows})


_MODELS: dict[TopicKind, type[BaseModel]] = {
    TopicKind.DESIRED: DesiredState,
    TopicKind.STATE: StateMessage,
    TopicKind.TELEMETRY: TelemetryMessage,
    TopicKind.EVENTS: EventMessage,
    TopicKind.STATUS: StatusMessage,
}


def model_for(kind: TopicKind | str) -> type[BaseModel]:
    """The pydantic model carried on topics of `kind`."""
    try:
        return _MODELS[TopicKind(kind)]
    except ValueError as exc:
        raise MessageDecodeError("unknown_kind", f"no message kind {kind!r}") from exc


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode(kind: TopicKind | str, payload: bytes | str) -> BaseModel:
    """Parse and validate `payload` as the message of topic `kind`."""
    model = model_for(kind)
    try:
        # pydantic-core parses and validates in one pass: the ingest path's largest saving per message.
        message = model.model_validate_json(payload)
    except ValidationError:
        return _decode_slowly(model, payload)  # says precisely why (or, rarely, accepts it)
    version = getattr(message, "schema_version", SCHEMA_VERSION)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise MessageDecodeError("unknown_schema_version", f"schema_version {version!r} is not supported")
    return message


def _decode_slowly(model: type[BaseModel], payload: bytes | str) -> BaseModel:
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageDecodeError("malformed_json", str(exc)[:200]) from exc
    if not isinstance(raw, dict):
        raise MessageDecodeError("malformed_json", f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise MessageDecodeError("unknown_schema_version", f"schema_version {version!r} is not supported")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise MessageDecodeError("invalid", _summarise(exc)) from exc


def message_id_of(message: BaseModel) -> str | None:
    """The id that makes a redelivery recognisable, where the message has one."""
    value = getattr(message, "message_id", None)
    return value if isinstance(value, str) and value else None


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)[:3]
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors)
