"""schemathesis against the ASGI app, every check it offers, as an admin and with no credential.

Each operation gets a bounded number of generated requests (valid and invalid ones), so the run stays
short; any server error, undocumented status, content type or header, or response that does not
match its schema fails the test with a curl line to reproduce it.
"""

from __future__ import annotations

from typing import Any

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from control_plane.api.main import create_app
from control_plane.config import Settings

MAX_EXAMPLES = 12



def _openapi_document() -> dict[str, Any]:
    """The document the app serves; building it touches no database (each test calls its own app)."""
    with tempfile.TemporaryDirectory() as data_dir:
        return create_app(Settings(data_dir=Path(data_dir), fleet_enabled=False)).openapi()


schema = schemathesis.openapi.from_dict(_openapi_document())


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
