"""maintenance_turns: every worker offers to run the reconciler; one runs it per interval

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ingest.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "maintenance_turns",
        sa.Column("name", sa.String(length=50), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("until", ingest.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_maintenance_turns")),
    )


def downgrade() -> None:
    op.drop_table("maintenance_turns")
