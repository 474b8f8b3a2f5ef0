"""Bounds every wire field keeps: the control plane's column sizes and integer ranges, and
plausible values.

A device message outside them is refused by `shared.messages.decode` (reason "invalid") and costs
only itself; one inside them always fits the columns it is stored in. Free text (a reason, an
event's message) is cut to its column's size instead, since an agent's long error text is not a
mistake worth losing the report for.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

INT32_MAX = 2**31 - 1  # INTEGER columns
INT64_MAX = 2**63 - 1  # BIGINT columns
MAX_BYTES = 2**50  # 1 PiB: more memory or disk than any edge device reports
MAX_MEASURE = 1e9  # seconds, tokens per second: finite and far above anything real
MAX_WINDOW_S = 86_400  # a telemetry window spans at most a day
# Windows lie in this span: time series step by minutes and hours from them without overflowing.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
MAX_REQUESTS_PER_S = 1_000  # a window's requests, per second of it (at least a minute counted)
MAX_DETAIL_BYTES = 4096  # an event's `detail`, as JSON
MAX_GOLDEN_PROMPTS = 64  # prompts in a version's golden set, so in a device's golden outcome
MAX_LABELS = 32  # entries in a small dict or list of names (error types, accelerators)

MODEL_CHARS = 128  # models.name, telemetry_windows.model, devices.current_model
VERSION_CHARS = 64  # model_versions.version, telemetry_windows.version, devices.current_version
MESSAGE_ID_CHARS = 64  # telemetry_windows.message_id, device_events.message_id
ID_CHARS = 128  # ids a message names itself by (the stored device id comes from its topic)
NAME_CHARS = 64  # short names: formats, quantizations, error types, architectures
REASON_CHARS = 2000  # devices.phase_reason


def _cut_to(max_chars: int) -> BeforeValidator:
    def cut(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        # PostgreSQL text holds neither NUL nor a lone surrogate (JSON's "\ud800" decodes to one).
        text = value[:max_chars].replace("\x00", "\ufffd")
        return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text

    return BeforeValidator(cut)


# What a name may not hold, stated once for the validator and for the OpenAPI schema: control
# characters (NUL among them, which a column cannot hold) and lone surrogates.
CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f"
_NAME_PATTERN = f"^[^{CONTROL_CHARACTERS}]*$"
_FORBIDDEN_IN_NAMES = re.compile(f"[{CONTROL_CHARACTERS}\ud800-\udfff]")


def _printable(value: str) -> str:
    if _FORBIDDEN_IN_NAMES.search(value):
        raise ValueError("holds a control character or an invalid code point")
    return value


_Printable = AfterValidator(_printable)
# The schema states the rule so clients (and schemathesis) know it; the validator enforces it.
_NAME_SCHEMA = {"pattern": _NAME_PATTERN}
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
BigCount = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Half the range: the control plane ranks a status report as 2 * seq (+1 offline) in a BIGINT.
ReportSeq = Annotated[int, Field(ge=0, le=INT64_MAX // 2)]
ByteCount = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Measure = Annotated[float, Field(ge=0, le=MAX_MEASURE, allow_inf_nan=False)]
ModelName = Annotated[str, Field(max_length=MODEL_CHARS, json_schema_extra=_NAME_SCHEMA), _Printable]
VersionName = Annotated[str, Field(max_length=VERSION_CHARS, json_schema_extra=_NAME_SCHEMA), _Printable]
ShortName = Annotated[str, Field(max_length=NAME_CHARS, json_schema_extra=_NAME_SCHEMA), _Printable]
MessageId = Annotated[str, Field(min_length=1, max_length=MESSAGE_ID_CHARS, json_schema_extra=_NAME_SCHEMA), _Printable]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Reason = Annotated[str, _cut_to(REASON_CHARS)]
Note = Annotated[str, _cut_to(256)]  # descriptive text not stored in a column of its own
