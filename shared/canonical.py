"""Canonical JSON: the exact bytes a signature covers.

Keys sorted, no whitespace, UTF-8, and only what JSON encodes one way (objects, arrays, strings,
integers, booleans, null): a float has several spellings, so it is refused.
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import SharedError


class CanonicalJSONError(SharedError, ValueError):
    """A value that has no single canonical encoding."""


def canonical_json(value: Any) -> bytes:
    _check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _check(value: Any) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalJSONError(f"object key {key!r} is not a string")
            _check(item)
    elif isinstance(value, list):
        for item in value:
            _check(item)
    elif isinstance(value, float):
        raise CanonicalJSONError(f"float {value!r} has no canonical encoding")
    elif value is not None and not isinstance(value, str | int | bool):
        raise CanonicalJSONError(f"{type(value).__name__} is not JSON")
