"""rollout members without a foreign key to devices

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 04:45:00

A rollout inserts one `rollout_devices` row per member at creation. PostgreSQL checked each new
row's device with `SELECT ... FOR KEY SHARE`, locking every device row (a WAL record each) in the
request that promotes: 1,000 members took 12.8 ms to insert with the key, 5.3 ms without it
(same rows, idle machine). The members are always devices just read from `devices` in the same
transaction, and devices are never deleted (a retired device keeps its history), so the check
guarded nothing. `desired_states` keeps its key: its upserts rewrite existing rows, which
PostgreSQL does not check again.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_rollout_devices_device_id_devices"


def upgrade() -> None:
    # batch mode: SQLite drops a constraint by copying the table.
    with op.batch_alter_table("rollout_devices") as batch:
        batch.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("rollout_devices") as batch:
        batch.create_foreign_key(FK, "devices", ["device_id"], ["id"])
