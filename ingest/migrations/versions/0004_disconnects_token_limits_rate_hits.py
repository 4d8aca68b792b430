"""why an instance was disconnected, a rate limit per API token, and the SQL rate-limit window

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ingest.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Instances disconnected before this revision keep no reason: none was recorded.
    op.add_column("instances", sa.Column("disconnected_reason", sa.Text(), nullable=True))
    op.add_column(
        "instances",
        sa.Column("disconnected_at", ingest.models.UTCDateTime(timezone=True), nullable=True),
    )
    # Existing tokens keep the deployment's limit (NULL).
    op.add_column("api_tokens", sa.Column("rate_limit", sa.String(length=100), nullable=True))
    op.create_table(
        "api_rate_hits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rate_key", sa.String(length=200), nullable=False),
        sa.Column("hit_at", ingest.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", ingest.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_rate_hits")),
    )
    with op.batch_alter_table("api_rate_hits", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_api_rate_hits_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index("ix_api_rate_hits_key_hit_at", ["rate_key", "hit_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("api_rate_hits", schema=None) as batch_op:
        batch_op.drop_index("ix_api_rate_hits_key_hit_at")
        batch_op.drop_index(batch_op.f("ix_api_rate_hits_expires_at"))
    op.drop_table("api_rate_hits")
    # Plain DROP COLUMN (SQLite 3.35+), not batch mode: a batch rebuild drops and recreates
    # the table, which SQLite refuses while media_items and api_tokens refer to instances.
    op.drop_column("api_tokens", "rate_limit")
    op.drop_column("instances", "disconnected_at")
    op.drop_column("instances", "disconnected_reason")
