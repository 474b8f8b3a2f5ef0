"""devices stage the rotated secret until its first use

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 09:15:00

A credential rotation no longer swaps the secret when the device fetches it: the new secret's
hash waits in `staged_secret_hash` (each fetch replaces it) and the device's first request with
it completes the rotation, so a lost answer or an earlier fetch by someone else does not lock
the device out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("staged_secret_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("staged_secret_hash")
