"""the wake-up relay: new rows are found by an index, and PostgreSQL announces them

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

The receiver no longer publishes wake-ups: it commits rows with no ``enqueued_at``, and the
relay in every worker process (``ingest.wake_relay``) publishes them. A partial index holds
exactly those rows, so a relay pass reads a handful of index entries whatever the backlog.
On PostgreSQL a statement-level trigger sends ``NOTIFY ingest_media_new`` with every insert
into ``media_items``; it is delivered at commit, so the relay wakes when the rows are visible.
Elsewhere (SQLite) the relay polls.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNWOKEN = "state = 'pending' AND enqueued_at IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_media_items_unwoken",
        "media_items",
        ["id"],
        postgresql_where=sa.text(UNWOKEN),
        sqlite_where=sa.text(UNWOKEN),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION ingest_media_new_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('ingest_media_new', '');
                RETURN NULL;
            END $$
            """
        )
        op.execute(
            """
            CREATE TRIGGER media_items_new_notify
            AFTER INSERT ON media_items
            FOR EACH STATEMENT EXECUTE FUNCTION ingest_media_new_notify()
            """
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS media_items_new_notify ON media_items")
        op.execute("DROP FUNCTION IF EXISTS ingest_media_new_notify()")
    op.drop_index("ix_media_items_unwoken", table_name="media_items")
