"""rollout members without a foreign key to their rollout

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 07:45:00

As with the key to `devices` (0006): a rollout inserts all its members in the request that
promotes, and PostgreSQL checked each new row's rollout with a locking lookup, 10,000 times on
the one row that same statement's transaction had just inserted. EXPLAIN ANALYZE of that insert
at 10,000 members: 65-70 ms of its 160-210 ms in the constraint's trigger. Members are only ever
written for the rollout being created or advanced, and rollouts are never deleted (they are the
fleet's history), so the check guarded nothing.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_rollout_devices_rollout_id_rollouts"


def upgrade() -> None:
    # batch mode: SQLite drops a constraint by copying the table.
    with op.batch_alter_table("rollout_devices") as batch:
        batch.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        batch.create_foreign_key(FK, "rollouts", ["rollout_id"], ["id"])
