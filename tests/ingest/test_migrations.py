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
