"""devices remember the order of the reports their state and status come from

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 11:45:00

With several control-plane replicas ingesting, a replica that lags could write a device's older
state or status over a newer one. `state_seq` and `status_seq` hold the order (`report_seq`) of
the reports stored, and ingest overwrites only with a newer one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("state_seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("status_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("status_seq")
        batch.drop_column("state_seq")
