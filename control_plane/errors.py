"""The control plane's errors and the mapping of its domain error to RFC 9457 problem+json.

Error tree::

    ControlPlaneError           the root: `except ControlPlaneError` catches any error of the server
    ├── DomainError             a failure the API reports to its caller, with a stable `code`
    │   └── DeviceCAError       a CSR or the device CA refused (trust/device_ca.py)
    ├── QuantizeError           a quantization refused or failed (modelopt/quantize.py)
    └── SigningConfigError      (ValueError) release keys or root metadata unusable (trust/releases.py)

DomainError(code, detail)       raised by services; `code` is an `ErrorCode`, tests assert it
  -> HTTP status from STATUS_BY_CODE
  -> application/problem+json {type, title, status, detail, code, instance, ...extra}

Not in the tree: PayloadTooLarge and PacketTooLarge subclass the framework's own exceptions
(Starlette's, amqtt's) so that its handlers see them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every `code` a problem+json response carries; the value is the wire string, stable."""

    UNAUTHENTICATED = "unauthenticated"
    ENROLLMENT_TOKEN_INVALID = "enrollment_token_invalid"
    ENROLLMENT_TOKEN_EXPIRED = "enrollment_token_expired"
    FORBIDDEN = "forbidden"
    CROSS_SITE_REQUEST = "cross_site_request"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    VERSION_NOT_FOUND = "version_not_found"
    ARTIFACT_NOT_FOUND = "artifact_not_found"
    DEVICE_NOT_FOUND = "device_not_found"
    TOKEN_NOT_FOUND = "token_not_found"
    ROLLOUT_NOT_FOUND = "rollout_not_found"
    JOB_NOT_FOUND = "job_not_found"
    GOLDEN_SET_NOT_FOUND = "golden_set_not_found"
    MODEL_EXISTS = "model_exists"
    VERSION_EXISTS = "version_exists"
    DEVICE_EXISTS = "device_exists"
    ENROLLMENT_TOKEN_USED = "enrollment_token_used"
    ROLLOUT_CONFLICT = "rollout_conflict"
    INVALID_STATE = "invalid_state"
    VERSION_IN_USE = "version_in_use"
    NO_GOOD_VERSION = "no_good_version"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    RATE_LIMITED = "rate_limited"
    VALIDATION_ERROR = "validation_error"
    CSR_INVALID = "csr_invalid"
    DEVICE_CERTIFICATES_DISABLED = "device_certificates_disabled"
    CERTIFICATE_NOT_DUE = "certificate_not_due"
    SHA256_MISMATCH = "sha256_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    UNRECOGNIZED_ARTIFACT = "unrecognized_artifact"
    INVALID_REFERENCE = "invalid_reference"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INVALID_SELECTOR = "invalid_selector"
    TOO_MANY_LABELS = "too_many_labels"
    QUALITY_BELOW_FLOOR = "quality_below_floor"
    TOO_MANY_POINTS = "too_many_points"
    QUANTIZATION_UNSUPPORTED = "quantization_unsupported"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    BLOB_STORE_UNAVAILABLE = "blob_store_unavailable"
    DEVICE_CA_INVALID = "device_ca_invalid"
    # Answered by the framework's exception handlers with their own status (docs/api.md).
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    HTTP_ERROR = "http_error"


# The framework's own errors (method_not_allowed, internal_error, http_error) keep their status.
STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.ENROLLMENT_TOKEN_INVALID: 401,
    ErrorCode.ENROLLMENT_TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CROSS_SITE_REQUEST: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.VERSION_NOT_FOUND: 404,
    ErrorCode.ARTIFACT_NOT_FOUND: 404,
    ErrorCode.DEVICE_NOT_FOUND: 404,
    ErrorCode.TOKEN_NOT_FOUND: 404,
    ErrorCode.ROLLOUT_NOT_FOUND: 404,
    ErrorCode.JOB_NOT_FOUND: 404,
    ErrorCode.GOLDEN_SET_NOT_FOUND: 404,
    ErrorCode.MODEL_EXISTS: 409,
    ErrorCode.VERSION_EXISTS: 409,
    ErrorCode.DEVICE_EXISTS: 409,
    ErrorCode.ENROLLMENT_TOKEN_USED: 409,
    ErrorCode.ROLLOUT_CONFLICT: 409,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.VERSION_IN_USE: 409,
    ErrorCode.NO_GOOD_VERSION: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RANGE_NOT_SATISFIABLE: 416,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.CSR_INVALID: 422,
    ErrorCode.DEVICE_CERTIFICATES_DISABLED: 409,
    ErrorCode.CERTIFICATE_NOT_DUE: 409,
    ErrorCode.SHA256_MISMATCH: 422,
    ErrorCode.SIZE_MISMATCH: 422,
    ErrorCode.UNRECOGNIZED_ARTIFACT: 422,
    ErrorCode.INVALID_REFERENCE: 422,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.INVALID_SELECTOR: 422,
    ErrorCode.TOO_MANY_LABELS: 422,
    ErrorCode.QUALITY_BELOW_FLOOR: 422,
    ErrorCode.TOO_MANY_POINTS: 422,
    ErrorCode.QUANTIZATION_UNSUPPORTED: 422,
    ErrorCode.INSUFFICIENT_STORAGE: 507,
    ErrorCode.BLOB_STORE_UNAVAILABLE: 503,
    ErrorCode.DEVICE_CA_INVALID: 400,
}


class ControlPlaneError(Exception):
    """Base of every error from the `control_plane` package."""


class DomainError(ControlPlaneError):
    """A failure the API reports to its caller; `extra` fields are merged into the problem body."""

    def __init__(self, code: ErrorCode, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 400)


def problem(status: int, code: ErrorCode, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    from http import HTTPStatus

    body: dict[str, Any] = {
        "type": f"https://slmops.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": str(code),
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body
