"""devices keep their broker password hash

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 08:00:00

The registry is the source of truth for the broker's device credentials: each device keeps the
`$7$` hash Mosquitto's password_file holds, so the control plane rebuilds the file from the
database at start (a lost file comes back, a restored old one loses its revoked devices).
Devices enrolled before this revision have NULL until the first start adopts their line from
the current file.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("mqtt_password_hash", sa.String(length=160), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("mqtt_password_hash")
