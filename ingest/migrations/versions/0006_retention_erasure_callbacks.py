"""retention and erasure (states purged and erased, who and when), per-instance callbacks and
their outbox

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-22

Existing instances keep everything (no retention) and have no callback URL. The state check
of ``media_items`` is replaced in a batch: SQLite cannot alter a CHECK, so there the table is
copied (nothing refers to ``media_items`` yet: the outbox is created after).

Downgrade refuses while rows are purged or erased: the older code knows neither state.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ingest.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = "state IN ('pending', 'downloading', 'stored', 'failed', 'expired')"
NEW_STATES = (
    "state IN ('pending', 'downloading', 'stored', 'failed', 'expired', 'purged', 'erased')"
)


def upgrade() -> None:
    op.add_column("instances", sa.Column("retention_days", sa.Integer(), nullable=True))
    op.add_column("instances", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("instances", sa.Column("callback_secret_encrypted", sa.Text(), nullable=True))
    with op.batch_alter_table("media_items", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("removed_at", ingest.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("removed_by", sa.String(length=200), nullable=True))
        batch_op.drop_constraint(batch_op.f("ck_media_items_state"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_media_items_state"), NEW_STATES)
        batch_op.create_index(
            "ix_media_items_state_received", ["state", "received_at"], unique=False
        )

    op.create_table(
        "callback_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("media_item_id", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.String(length=40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", ingest.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("lease_until", ingest.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", ingest.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", ingest.models.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'failed')", name=op.f("ck_callback_events_state")
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_callback_events_instance_id_instances"),
        ),
        sa.ForeignKeyConstraint(
            ["media_item_id"],
            ["media_items.id"],
            name=op.f("fk_callback_events_media_item_id_media_items"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_callback_events_event_id")),
    )
    with op.batch_alter_table("callback_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_callback_events_instance_id"), ["instance_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_callback_events_media_item_id"), ["media_item_id"], unique=False
        )
        batch_op.create_index(
            "ix_callback_events_state_next_attempt", ["state", "next_attempt_at"], unique=False
        )


def downgrade() -> None:
    bind = op.get_bind()
    removed = bind.execute(
        sa.text("SELECT count(*) FROM media_items WHERE state IN ('purged', 'erased')")
    ).scalar_one()
    if removed:
        raise RuntimeError(
            f"{removed} media rows are purged or erased, states revision 0005 does not know; "
            "nothing was changed"
        )
    op.drop_table("callback_events")
    with op.batch_alter_table("media_items", schema=None) as batch_op:
        batch_op.drop_index("ix_media_items_state_received")
        batch_op.drop_constraint(batch_op.f("ck_media_items_state"), type_="check")
        batch_op.create_check_constraint(batch_op.f("ck_media_items_state"), OLD_STATES)
        batch_op.drop_column("removed_by")
        batch_op.drop_column("removed_at")
    op.drop_column("instances", "callback_secret_encrypted")
    op.drop_column("instances", "callback_url")
    op.drop_column("instances", "retention_days")
