"""docs/api.md lists every error code the control plane maps to an HTTP status."""

from __future__ import annotations

import re
from pathlib import Path

from control_plane.errors import STATUS_BY_CODE

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_error_code_is_documented_with_its_status() -> None:
    rows = {}
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \| (\d{3}) \|", line):
            for code in re.findall(r"`([a-z0-9_]+)`", match.group(1)):
                rows[code] = int(match.group(2))
    documented = {getattr(code, "value", code): status for code, status in STATUS_BY_CODE.items()}
    missing = sorted(set(documented) - set(rows))
    assert not missing, f"error codes missing from docs/api.md: {missing}"
    wrong = {code: (rows[code], status) for code, status in documented.items() if rows[code] != status}
    assert not wrong, f"docs/api.md gives another status (documented, actual): {wrong}"
