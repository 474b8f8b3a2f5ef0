"""desired states without an index on their version

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:30:00

Every assignment changes a desired state's version, and an update that changes an indexed column
cannot be made in place (a HOT update, which 0005 left room for): PostgreSQL wrote a new entry in
every index of the table for every device. Nothing filters desired states by version (they are
read by device id, or joined from devices). Upserting 10,000 assigned states took 170 ms with the
index and about 70 ms without it (same rows, same machine).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("desired_states") as batch:
        batch.drop_index("ix_desired_states_version")


def downgrade() -> None:
    with op.batch_alter_table("desired_states") as batch:
        batch.create_index("ix_desired_states_version", ["version"], unique=False)
