"""docs/api.md lists every error code the control plane answers, with its HTTP status."""

from __future__ import annotations

import re
from pathlib import Path

from control_plane.errors import STATUS_BY_CODE, ErrorCode

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_error_code_is_documented_with_its_status() -> None:
    rows = {}
    for line in API_DOC.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^\| (`[a-z0-9_]+`(?:, `[a-z0-9_]+`)*) \| (\d{3}|other) \|", line):
            for code in re.findall(r"`([a-z0-9_]+)`", match.group(1)):
                rows[code] = int(match.group(2)) if match.group(2).isdigit() else None
    documented = {getattr(code, "value", code): status for code, status in STATUS_BY_CODE.items()}
    missing = sorted({code.value for code in ErrorCode} - set(rows))
    assert not missing, f"error codes missing from docs/api.md: {missing}"
    wrong = {code: (rows[code], status) for code, status in documented.items() if rows[code] != status}
    assert not wrong, f"docs/api.md gives another status (documented, actual): {wrong}"
