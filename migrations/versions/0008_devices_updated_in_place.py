"""devices rows updated in place: room on each page, no index on the reported version

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 07:05:00

Every acknowledgement a device sends rewrites its `devices` row (phase, acked message, current
and previous version, last seen). On full pages, and with `current_version` indexed (a rollout
changes it on every device), none of those updates could be made in place (HOT): each wrote a
new entry in all five of the table's indexes. Storing the 10,000 acknowledgements of a
fleet-wide rollout took 280-340 ms of UPDATE; with room left on the pages and that index
dropped, 70-115 ms (same rows, same machine). Filtering the device list by version now reads
the devices in id order (the list's own order) and skips the others; a fleet's devices table is
small next to its telemetry. Pages written before this migration keep their layout until the
table is rewritten (VACUUM FULL).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_current_version")
    if op.get_bind().dialect.name == "postgresql":  # SQLite has no fillfactor
        op.execute("ALTER TABLE devices SET (fillfactor = 70)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE devices RESET (fillfactor)")
    with op.batch_alter_table("devices") as batch:
        batch.create_index("ix_devices_current_version", ["current_version"], unique=False)
