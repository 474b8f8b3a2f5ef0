"""dashboard sessions; audit entries name their actor's id

Revision ID: 0014
Revises: 0011
Create Date: 2026-12-06 08:00:00

The dashboard cookie held the operator's API token itself, and signing out did not end it. It now
holds a random session id; this table keeps only that id's hash and the token it stands for, and
signing out deletes the row. Audit entries named their actor by token name, and two tokens may
share a name: `actor_id` holds the token's (or device's) id. Rows from before keep ''.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0014"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("token_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name=op.f("fk_dashboard_sessions_token_id_api_tokens"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_dashboard_sessions")),
    )
    with op.batch_alter_table("dashboard_sessions") as batch:
        batch.create_index(batch.f("ix_dashboard_sessions_token_id"), ["token_id"], unique=False)
        batch.create_index(batch.f("ix_dashboard_sessions_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(
            sa.Column("actor_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("actor_id")
    with op.batch_alter_table("dashboard_sessions") as batch:
        batch.drop_index(batch.f("ix_dashboard_sessions_expires_at"))
        batch.drop_index(batch.f("ix_dashboard_sessions_token_id"))
    op.drop_table("dashboard_sessions")
