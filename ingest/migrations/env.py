"""Alembic environment: the URL comes from the caller's config (see ingest.migrate)."""

from __future__ import annotations

from alembic import context

from ingest.db import make_engine
from ingest.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        # Also when a migration refuses (0006's downgrade): a pooled connection left to the
        # garbage collector is a ResourceWarning in whatever runs next.
        engine.dispose()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copes.
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `ingest db upgrade`")
run_migrations_online()
