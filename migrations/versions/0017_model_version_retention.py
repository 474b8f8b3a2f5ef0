"""models keep their newest N versions; devices rotate their credential

Revision ID: 0017
Revises: 0014
Create Date: 2026-12-06 07:40:00

A model's retention policy: garbage collection deletes its versions beyond the newest
`keep_versions` (never one a device runs or is meant to run) and then every blob no artifact
references. NULL keeps every version. A device asked to rotate its credential
(`rotation_requested_at`, `rotation_grace_s`) keeps its previous secret's hash valid until
`previous_secret_expires_at`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("keep_versions", sa.Integer(), nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("previous_secret_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotation_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotation_grace_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for column in (
            "rotation_grace_s",
            "rotation_requested_at",
            "previous_secret_expires_at",
            "previous_secret_hash",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("models") as batch:
        batch.drop_column("keep_versions")
