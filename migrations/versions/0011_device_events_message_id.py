"""device events keyed by their message id

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 02:55:00

The control plane's ingest journal stores again, after a crash, what it had acknowledged to the
broker and not yet recorded as stored; a batch stored just before the crash comes back with it.
Telemetry windows were already unique per (device, message id); events now are too, so such a
replay (or any redelivery) stores each event once. Events written before this revision have no
message id, and NULLs never collide.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIQUE = "uq_device_events_device_message"


def upgrade() -> None:
    # batch mode: SQLite adds a constraint by copying the table.
    with op.batch_alter_table("device_events") as batch:
        batch.add_column(sa.Column("message_id", sa.String(length=64), nullable=True))
        batch.create_unique_constraint(UNIQUE, ["device_id", "message_id"])


def downgrade() -> None:
    with op.batch_alter_table("device_events") as batch:
        batch.drop_constraint(UNIQUE, type_="unique")
        batch.drop_column("message_id")
