"""the wake-up relay polls on PostgreSQL too: no notification with every insert

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

Migration 0007's trigger sent ``NOTIFY ingest_media_new`` with every insert into
``media_items``. PostgreSQL serialises the commits of notifying transactions, which cost the
receiver's write 16-26 % of its rate near 2,000 inserts/s (``python -m bench.notify_ceiling``);
the relay now polls its partial index on every database (``ingest.wake_relay``). Downgrade
puts the trigger back for the older code, which listens for it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS media_items_new_notify ON media_items")
        op.execute("DROP FUNCTION IF EXISTS ingest_media_new_notify()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # As migration 0007 created them.
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
