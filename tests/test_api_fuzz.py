"""schemathesis against the ASGI app, every check it offers, as an admin and with no credential.

Each operation gets a bounded number of generated requests (valid and invalid ones), so the run stays
short; any server error, undocumented status, content type or header, or response that does not
match its schema fails the test with a curl line to reproduce it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck

from control_plane.api.main import create_app
from control_plane.config import Settings
from tests.conftest import BACKENDS

MAX_EXAMPLES = 4


class CurrentApp:
    """The ASGI app schemathesis calls: each test points it at its own app (and database)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


# Serving the document touches no database; the tests swap in apps that have one.
current = CurrentApp(create_app(Settings(data_dir=Path(tempfile.gettempdir()) / "slmops-fuzz", fleet_enabled=False)))


# Inputs that a schema cannot fully state, so that a schema-valid request may still be a 422: an
# uploaded file's content (sniffed), opaque pagination cursors, `end` after `start`, a rollout
# stage's one-of-percent-or-count, a label selector's grammar. Every other check, and this one
# for every other operation, holds.
SEMANTIC_422 = """
[[operations]]
include-name = [
  "POST /v1/models/{name}/versions",
  "POST /v1/models/{name}/versions/{version}/artifacts",
  "GET /v1/devices",
  "POST /v1/devices/relabel",
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
schema = schemathesis.openapi.from_asgi("/openapi.json", current, config=schemathesis.Config.from_str(SEMANTIC_422))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No rate limits: schemathesis sends wrong credentials on purpose, many a second (tests/test_request_limits.py)."""
    return settings.model_copy(
        update={
            "rate_limit_auth_failures_per_min": 0,
            "rate_limit_enroll_failures_per_min": 0,
            "rate_limit_login_failures_per_min": 0,
        }
    )


@pytest.fixture
def fuzz_app(app: Any, db_url: str) -> Any:
    """One backend keeps the run short: PostgreSQL where configured (its column limits are stricter)."""
    if db_url.startswith("sqlite") and "postgres" in BACKENDS:
        pytest.skip("fuzzed on PostgreSQL")
    current.app = app
    return app


FUZZ_SETTINGS = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, never flaky
    suppress_health_check=list(HealthCheck),
    database=None,
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_as_admin(case: Any, fuzz_app: Any, admin_headers: dict[str, str]) -> None:
    case.call_and_validate(headers=admin_headers)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_without_credentials(case: Any, fuzz_app: Any) -> None:
    case.call_and_validate()
