"""a version's golden-prompt set

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 08:00:00

A version may carry a golden-prompt set (prompts with accepted answers). It is delivered with the
desired state, and the agent answers it on the device during the trial; rollouts gate on the pass
rate. NULL: the version has none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("golden_set", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("golden_set")
