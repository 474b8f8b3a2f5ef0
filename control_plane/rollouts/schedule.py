"""When and how fast a rollout may give devices its version: maintenance windows, a maximum rate,
and the abort threshold on failed activations.

A device's window is read in its own timezone (its label named by `timezone_label`, e.g.
`tz=Europe/Stockholm`, else the plan's). A device of the current stage outside its window waits
as `waiting_window`; the stage's bake time counts only the time some of its devices were inside
their window. The rate paces assignments within a stage: by `t` seconds after the stage started,
at most `max_per_minute * t / 60 + 1` of its devices were given the version.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.orm import Session

from control_plane.db import bulk
from control_plane.models import Device
from control_plane.rollouts.members import Member

WAITING_WINDOW = "waiting_window"
_HH_MM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
DEVICES: sa.Table = Device.__table__  # type: ignore[attr-defined]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc


class Window(BaseModel):
    """A daily window, `start` to `end` (HH:MM, local time); `end` before `start` crosses midnight."""

    start: str = Field(pattern=_HH_MM.pattern)
    end: str = Field(pattern=_HH_MM.pattern)

    def bounds(self) -> tuple[time, time]:
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


class Maintenance(BaseModel):
    windows: list[Window] = Field(min_length=1, max_length=24)
    timezone: str = Field(default="UTC", description="IANA timezone of the windows")
    timezone_label: str | None = Field(default="tz", description="device label that overrides the timezone")

    @field_validator("timezone")
    @classmethod
    def _known(cls, value: str) -> str:
        _zone(value)
        return value

    def zone_of(self, labels: dict[str, Any]) -> ZoneInfo:
        name = labels.get(self.timezone_label) if self.timezone_label else None
        try:
            return _zone(str(name)) if name else _zone(self.timezone)
        except ValueError:  # a device's bad label falls back to the plan's timezone
            return _zone(self.timezone)

    def open_spans(self, zone: ZoneInfo, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """Every window occurrence in `zone` that overlaps [start, end], as aware datetimes."""
        spans = []
        day = start.astimezone(zone).date() - timedelta(days=1)
        while day <= end.astimezone(zone).date():
            for window in self.windows:
                opens, closes = window.bounds()
                begin = datetime.combine(day, opens, zone)
                finish = datetime.combine(day + timedelta(days=1) if closes <= opens else day, closes, zone)
                if finish > start and begin < end:
                    spans.append((max(begin, start), min(finish, end)))
            day += timedelta(days=1)
        return spans

    def is_open(self, zone: ZoneInfo, now: datetime) -> bool:
        return bool(self.open_spans(zone, now, now + timedelta(microseconds=1)))


class AbortThreshold(BaseModel):
    """Abort (and roll back) once failed activations reach this share of the devices given the
    version, counted only from `min_failed` failures on (AWS IoT Jobs' abortConfig)."""

    failed_percent: float = Field(gt=0, le=100)
    min_failed: int = Field(default=1, ge=1)


def zones(session: Session, device_ids: list[str], maintenance: Maintenance) -> dict[str, ZoneInfo]:
    """device id -> the timezone its windows are read in."""
    out: dict[str, ZoneInfo] = {}
    for clause in bulk.matching(session, DEVICES.c.id, device_ids):
        for device_id, labels in session.execute(sa.select(DEVICES.c.id, DEVICES.c.labels).where(clause)).all():
            out[device_id] = maintenance.zone_of(labels or {})
    return out


def open_seconds(maintenance: Maintenance, zones_: set[ZoneInfo], start: datetime, end: datetime) -> float:
    """Seconds of [start, end] during which at least one of these timezones was inside a window."""
    spans = sorted(s for zone in zones_ for s in maintenance.open_spans(zone, start, end))
    total, reach = 0.0, start
    for begin, finish in spans:
        begin = max(begin, reach)
        if finish > begin:
            total += (finish - begin).total_seconds()
            reach = finish
    return total


def rate_budget(max_per_minute: int | None, stage_started: datetime, now: datetime, given: int) -> int | None:
    """How many more devices of the stage may be given the version now (None: no limit). The
    burst after a pause (a closed window) is capped at ten seconds' worth."""
    if max_per_minute is None:
        return None
    elapsed = max(0.0, (now - stage_started).total_seconds())
    paced = math.floor(max_per_minute * elapsed / 60) + 1 - given
    return max(0, min(paced, max(1, math.ceil(max_per_minute / 6))))


def admit(
    session: Session,
    plan: Any,
    candidates: list[Member],
    *,
    now: datetime,
    stage_started: datetime,
    given: int,
) -> tuple[list[Member], list[Member]]:
    """(members to assign now, members waiting for their window) among a stage's unassigned ones."""
    inside, held = list(candidates), list[Member]()
    if plan.maintenance is not None and candidates:
        by_device = zones(session, [m.device_id for m in candidates], plan.maintenance)
        inside, held = [], []
        for member in candidates:
            zone = by_device.get(member.device_id) or plan.maintenance.zone_of({})
            (inside if plan.maintenance.is_open(zone, now) else held).append(member)
    budget = rate_budget(plan.max_per_minute, stage_started, now, given)
    return (inside if budget is None else inside[:budget]), held


def should_abort(threshold: AbortThreshold | None, members: list[Member]) -> str | None:
    """The reason to abort, when failed activations crossed the threshold."""
    if threshold is None:
        return None
    given = [m for m in members if m.stage_index >= 0 and m.status not in ("incompatible", "rolled_back")]
    failed = sum(m.status == "failed" for m in given)
    if not given or failed < threshold.min_failed or failed * 100 < threshold.failed_percent * len(given):
        return None
    return (
        f"abort threshold: {failed} of {len(given)} activations failed "
        f"(limit {threshold.failed_percent:g}% from {threshold.min_failed} failures)"
    )
