"""media_items.lease_losses: the worker_lost cap counts lost leases, not every attempt

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows start at 0: losses before this column existed were never told apart.
    op.add_column(
        "media_items",
        sa.Column("lease_losses", sa.Integer(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("media_items") as batch:
        batch.drop_column("lease_losses")
