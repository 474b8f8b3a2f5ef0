"""The control plane's one domain error and its mapping to RFC 9457 problem+json.

DomainError(code, detail)          raised by services; `code` is stable, tests assert it
  -> HTTP status from STATUS_BY_CODE (default 400)
  -> application/problem+json {type, title, status, detail, code, instance, ...extra}
"""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE: dict[str, int] = {
    "unauthenticated": 401,
    "enrollment_token_invalid": 401,
    "enrollment_token_expired": 401,
    "forbidden": 403,
    "cross_site_request": 403,
    "not_found": 404,
    "model_not_found": 404,
    "version_not_found": 404,
    "artifact_not_found": 404,
    "device_not_found": 404,
    "token_not_found": 404,
    "rollout_not_found": 404,
    "job_not_found": 404,
    "golden_set_not_found": 404,
    "model_exists": 409,
    "version_exists": 409,
    "device_exists": 409,
    "enrollment_token_used": 409,
    "rollout_conflict": 409,
    "invalid_state": 409,
    "version_in_use": 409,
    "no_good_version": 409,
    "payload_too_large": 413,
    "range_not_satisfiable": 416,
    "rate_limited": 429,
    "validation_error": 422,
    "csr_invalid": 422,
    "device_certificates_disabled": 409,
    "certificate_not_due": 409,
    "sha256_mismatch": 422,
    "size_mismatch": 422,
    "unrecognized_artifact": 422,
    "invalid_reference": 422,
    "idempotency_key_reused": 422,
    "invalid_selector": 422,
    "too_many_labels": 422,
    "quality_below_floor": 422,
    "too_many_points": 422,
    "quantization_unsupported": 422,
    "insufficient_storage": 507,
    "blob_store_unavailable": 503,
}


class DomainError(Exception):
    """A failure the API reports to its caller; `extra` fields are merged into the problem body."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 400)


def problem(status: int, code: str, detail: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    from http import HTTPStatus

    body: dict[str, Any] = {
        "type": f"https://slmops.dev/problems/{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body
