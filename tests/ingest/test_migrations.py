from sqlalchemy import inspect

from ingest import migrate
from ingest.db import make_engine


def test_models_and_migrations_agree(database_url: str) -> None:
    # `alembic check`: raises if autogenerate would produce any operation.
    migrate.check(database_url)


def test_upgrade_is_idempotent_and_creates_every_table(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"accounts", "instances", "api_tokens", "media_items", "error_budget_events"} <= tables


def test_0002_counts_no_lease_loss_for_rows_that_existed_before(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import select

    from ingest.db import make_session_factory
    from ingest.models import MediaItem
    from tests.factories import make_instance, make_media_item

    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as session:
            item_id = make_media_item(session, make_instance(session), attempts=7).id
        command.downgrade(migrate.alembic_config(database_url), "0001")
        assert "lease_losses" not in {c["name"] for c in inspect(engine).get_columns("media_items")}
        migrate.upgrade(database_url)
        with sessions() as session:
            row = session.execute(
                select(MediaItem.attempts, MediaItem.lease_losses).where(MediaItem.id == item_id)
            ).one()
        assert tuple(row) == (7, 0)
    finally:
        engine.dispose()
