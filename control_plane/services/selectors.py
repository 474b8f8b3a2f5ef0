"""Label selectors (`region=eu,tier!=canary,gpu`) parsed once and applied as SQL filters."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import select

from control_plane.errors import DomainError, ErrorCode
from control_plane.models import Device, DeviceLabel

_TERM = re.compile(
    r"^\s*(?P<key>[A-Za-z0-9._/-]{1,63})\s*(?:(?P<op>!=|=)\s*(?P<value>[A-Za-z0-9._/+-]{0,63}))?\s*$"
)


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "exists"
    value: str | None = None


def parse_selector(text: str | None) -> list[Requirement]:
    if not text or not text.strip():
        return []
    requirements = []
    for raw in text.split(","):
        match = _TERM.match(raw)
        if match is None:
            raise DomainError(
                ErrorCode.INVALID_SELECTOR,
                f"cannot parse selector term {raw!r}; use key=value, key!=value or key",
            )
        op = match["op"] or "exists"
        requirements.append(Requirement(match["key"], op, match["value"]))
    return requirements


def selector_clauses(requirements: list[Requirement]) -> list[sa.ColumnElement[bool]]:
    clauses: list[sa.ColumnElement[bool]] = []
    for req in requirements:
        has_key = select(DeviceLabel.device_id).where(DeviceLabel.key == req.key)
        if req.op == "exists":
            clauses.append(Device.id.in_(has_key))  # type: ignore[attr-defined]
        elif req.op == "=":
            clauses.append(Device.id.in_(has_key.where(DeviceLabel.value == req.value)))  # type: ignore[attr-defined]
        else:  # "!=" matches devices without the key too, as Kubernetes does
            clauses.append(Device.id.not_in(has_key.where(DeviceLabel.value == req.value)))  # type: ignore[attr-defined]
    return clauses


def matches(requirements: list[Requirement], labels: dict[str, str]) -> bool:
    for req in requirements:
        value = labels.get(req.key)
        if req.op == "exists" and value is None:
            return False
        if req.op == "=" and value != req.value:
            return False
        if req.op == "!=" and value == req.value:
            return False
    return True
