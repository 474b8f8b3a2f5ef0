"""desired states that withdraw a model (serve nothing)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 17:50:00

A rollback restores each device's desired state from before the rollout; a device that had none
(its first model came with the rolled-back rollout) is sent a desired state with `unload` set,
so it stops serving the withdrawn version instead of keeping it. The column mirrors the payload's
flag so the fleet summary can tell "serving nothing, as asked" from "not on its desired state"
without reading JSON.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("desired_states", sa.Column("unload", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("desired_states") as batch:
        batch.drop_column("unload")
