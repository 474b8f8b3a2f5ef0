"""Daily partitions of the raw telemetry table on PostgreSQL (migration 0020).

`telemetry_windows` is partitioned by RANGE (window_end): one table per UTC day, named
`telemetry_windows_pYYYYMMDD`, plus a DEFAULT partition that stores a window for a day that has
none (a device whose clock is off, a delivery days late). They live in the `telemetry_parts`
schema so that comparing the models with the database sees one table.

ensure_days(session, today)
  -> yesterday, today and AHEAD_DAYS more get a partition; rows of such a day already in the
     default partition move into it first (PostgreSQL refuses to attach a range the default holds)
drop_expired(session, cutoff)
  -> day partitions that end at or before `cutoff` are dropped whole; default-partition rows older
     than `cutoff` are deleted (the only rows retention still deletes one by one)

Elsewhere (SQLite, or a table built without partitions) both do nothing, and retention deletes rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

TABLE = "telemetry_windows"
SCHEMA = "telemetry_parts"
DEFAULT = f"{SCHEMA}.telemetry_windows_default"
AHEAD_DAYS = 2
_DAY_NAME = re.compile(r"telemetry_windows_p(\d{8})")


@dataclass(frozen=True)
class Dropped:
    partitions: list[str]
    default_rows: int


def is_partitioned(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return False
    kind = session.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": TABLE})
    return kind.scalar() == "p"


def day_partitions(session: Session) -> dict[date, str]:
    """The day partitions attached now, by day."""
    rows = session.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": TABLE},
    )
    found: dict[date, str] = {}
    for (name,) in rows:
        match = _DAY_NAME.fullmatch(name)
        if match:
            found[datetime.strptime(match.group(1), "%Y%m%d").date()] = name  # noqa: DTZ007 (a date)
    return found


def _bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), UTC)
    return start, start + timedelta(days=1)


def create_day(session: Session, day: date) -> str:
    """Attach the partition of `day`, taking its rows out of the default partition first."""
    name = f"telemetry_windows_p{day:%Y%m%d}"
    low, high = _bounds(day)
    # Waits for inserts in flight and holds new ones until commit: an insert routed by the old
    # bounds would put a row of this day in the default partition after its rows were moved.
    session.execute(sa.text(f"LOCK TABLE {TABLE} IN SHARE ROW EXCLUSIVE MODE"))
    session.execute(sa.text(f"CREATE TABLE {SCHEMA}.{name} (LIKE {TABLE} INCLUDING DEFAULTS)"))
    session.execute(
        sa.text(
            f"WITH moved AS (DELETE FROM {DEFAULT} WHERE window_end >= :low AND window_end < :high RETURNING *) "
            f"INSERT INTO {SCHEMA}.{name} SELECT * FROM moved"
        ),
        {"low": low, "high": high},
    )
    bounds = f"FROM ('{low.isoformat()}') TO ('{high.isoformat()}')"
    session.execute(sa.text(f"ALTER TABLE {TABLE} ATTACH PARTITION {SCHEMA}.{name} FOR VALUES {bounds}"))
    return name


def ensure_days(session: Session, today: date) -> list[str]:
    """Partitions from yesterday to AHEAD_DAYS after `today`; returns those created now."""
    if not is_partitioned(session):
        return []
    existing = day_partitions(session)
    wanted = [today + timedelta(days=offset) for offset in range(-1, AHEAD_DAYS + 1)]
    return [create_day(session, day) for day in wanted if day not in existing]


def drop_expired(session: Session, cutoff: datetime) -> Dropped:
    """Drop the day partitions wholly before `cutoff`; delete older rows of the default partition."""
    if not is_partitioned(session):
        return Dropped([], 0)
    expired = [name for day, name in sorted(day_partitions(session).items()) if _bounds(day)[1] <= cutoff]
    for name in expired:
        session.execute(sa.text(f"DROP TABLE {SCHEMA}.{name}"))
    deleted = session.execute(sa.text(f"DELETE FROM {DEFAULT} WHERE window_end < :cutoff"), {"cutoff": cutoff})
    return Dropped(expired, deleted.rowcount or 0)  # type: ignore[attr-defined]
