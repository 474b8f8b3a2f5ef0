"""schemathesis against the ASGI app, every check it offers, as an admin and with no credential.

Each operation gets a bounded number of generated requests (valid and invalid ones), so the run stays
short; any server error, undocumented status, content type or header, or response that does not
match its schema fails the test with a curl line to reproduce it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from control_plane.api.main import create_app
from control_plane.config import Settings

MAX_EXAMPLES = 6


def _openapi_document() -> dict[str, Any]:
    """The document the app serves; building it touches no database (each test calls its own app)."""
    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(Settings(data_dir=Path(data_dir), fleet_enabled=False)).openapi()


# Inputs that a schema cannot fully state, so that a schema-valid request may still be a 422: an
# uploaded file's content (sniffed), opaque pagination cursors, `end` after `start`, a rollout
# stage's one-of-percent-or-count. Every other check, and this one for every other operation, holds.
SEMANTIC_422 = """
[[operations]]
include-name = [
  "POST /v1/models/{name}/versions",
  "POST /v1/models/{name}/versions/{version}/artifacts",
  "GET /v1/devices",
  "GET /v1/audit",
  "GET /v1/tokens",
  "GET /v1/models",
  "GET /v1/models/{name}/versions",
  "GET /v1/rollouts",
  "GET /v1/rollouts/{rollout_id}/evaluations",
  "GET /v1/telemetry/rollouts/{rollout_id}",
  "POST /v1/rollouts",
  "GET /v1/telemetry/versions",
  "GET /v1/telemetry/devices/{device_id}",
]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
"""
schema = schemathesis.openapi.from_dict(_openapi_document(), config=schemathesis.Config.from_str(SEMANTIC_422))


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, never flaky
    suppress_health_check=list(HealthCheck),
    database=None,
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_as_admin(case: Any, app: Any, admin_headers: dict[str, str]) -> None:
    case.call_and_validate(app=app, headers=admin_headers)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_without_credentials(case: Any, app: Any) -> None:
    case.call_and_validate(app=app)
