"""raw telemetry windows partitioned by day on PostgreSQL

Revision ID: 0020
Revises: 0014
Create Date: 2026-12-06 08:40:00

Retention deleted expired raw windows row by row; on PostgreSQL the table is now partitioned by
RANGE (window_end), one partition per UTC day in the `telemetry_parts` schema plus a DEFAULT one,
so retention drops whole days (control_plane/telemetry/partitions.py). A partitioned table's
primary and unique keys must contain the partition key: the key is now (id, window_end) and
duplicates are refused on (device_id, message_id, window_end). A redelivery carries the window_end
it was sent with, so it is still stored once; two different windows that reuse a message id are
now both kept. SQLite keeps a plain table with the same keys.

Upgrade moves the rows into the new table (a partition per day present, created first); downgrade
moves them back into a plain table, keeping one row per (device_id, message_id).
"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0020"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "telemetry_windows"
PARTS = "telemetry_parts"
UNIQUE = "uq_telemetry_windows_device_message"
INDEXED = ("device_id", "version", "window_end", "received_at")


def _columns() -> list[sa.Column]:  # type: ignore[type-arg]
    text = sqlmodel.sql.sqltypes.AutoString
    ts = sa.DateTime(timezone=True)
    floats = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "ttft_p95_ms", "tokens_per_s_p50")
    return [
        sa.Column("id", text(length=36), nullable=False),
        sa.Column("device_id", text(length=36), nullable=False),
        sa.Column("message_id", text(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("window_start", ts, nullable=False),
        sa.Column("window_end", ts, nullable=False),
        sa.Column("model", text(length=128), nullable=True),
        sa.Column("version", text(length=64), nullable=True),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in floats),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("peak_rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("latency_histogram", sa.JSON(), nullable=False),
        sa.Column("received_at", ts, nullable=False),
    ]


def _create(key: list[str], unique: list[str], **kwargs: str) -> None:
    op.create_table(
        TABLE,
        *_columns(),
        sa.PrimaryKeyConstraint(*key, name="pk_telemetry_windows"),
        sa.UniqueConstraint(*unique, name=UNIQUE),
        **kwargs,
    )
    for column in INDEXED:
        op.create_index(f"ix_telemetry_windows_{column}", TABLE, [column])


def _set_aside(name: str) -> None:
    """Rename the current table and free its index and constraint names for the new one."""
    op.execute(f"ALTER TABLE {TABLE} RENAME TO {name}")
    op.execute(f"ALTER TABLE {name} DROP CONSTRAINT pk_telemetry_windows, DROP CONSTRAINT {UNIQUE}")
    for column in INDEXED:
        op.execute(f"DROP INDEX ix_telemetry_windows_{column}")


def _copy(source: str, suffix: str = "") -> None:
    names = ", ".join(column.name for column in _columns())
    op.execute(f"INSERT INTO {TABLE} ({names}) SELECT {names} FROM {source}{suffix}")
    op.execute(f"DROP TABLE {source}")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table(TABLE, recreate="always") as batch:
            batch.drop_constraint(UNIQUE, type_="unique")
            batch.drop_constraint("pk_telemetry_windows", type_="primary")
            batch.create_primary_key("pk_telemetry_windows", ["id", "window_end"])
            batch.create_unique_constraint(UNIQUE, ["device_id", "message_id", "window_end"])
        return
    _set_aside("telemetry_windows_unpartitioned")
    _create(
        ["id", "window_end"], ["device_id", "message_id", "window_end"], postgresql_partition_by="RANGE (window_end)"
    )
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {PARTS}")
    op.execute(f"CREATE TABLE {PARTS}.telemetry_windows_default PARTITION OF {TABLE} DEFAULT")
    days = op.get_bind().execute(
        sa.text("SELECT DISTINCT date_trunc('day', window_end AT TIME ZONE 'UTC') FROM telemetry_windows_unpartitioned")
    )
    for (day,) in days.all():
        bounds = f"FROM ('{day:%Y-%m-%d} 00:00+00') TO ('{day + timedelta(days=1):%Y-%m-%d} 00:00+00')"
        op.execute(f"CREATE TABLE {PARTS}.telemetry_windows_p{day:%Y%m%d} PARTITION OF {TABLE} FOR VALUES {bounds}")
    _copy("telemetry_windows_unpartitioned")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table(TABLE, recreate="always") as batch:
            batch.drop_constraint(UNIQUE, type_="unique")
            batch.drop_constraint("pk_telemetry_windows", type_="primary")
            batch.create_primary_key("pk_telemetry_windows", ["id"])
            batch.create_unique_constraint(UNIQUE, ["device_id", "message_id"])
        return
    _set_aside("telemetry_windows_partitioned")
    _create(["id"], ["device_id", "message_id"])
    _copy("telemetry_windows_partitioned", " ON CONFLICT (device_id, message_id) DO NOTHING")
    op.execute(f"DROP SCHEMA {PARTS} CASCADE")
