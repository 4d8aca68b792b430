"""The long-lived parts one process needs, built once from settings.

Web and worker processes each build one :class:`Services` at start-up (after forking) and
pass it down; nothing here is a global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from ingest.db import make_engine, make_session_factory, one_statement_engine
from ingest.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

    from ingest.storage import Storage


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    redis: Redis | None = field(default=None)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        redis: Redis | None = None,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        ping_after_idle: float | None = None,
    ) -> Services:
        """``pool_size``: SQL connections kept open (a threaded worker wants one per thread);
        ``max_overflow``: more opened at a peak and closed after (default: ``pool_size``).
        ``ping_after_idle``: see :func:`ingest.db.make_engine` (default: ping every checkout).
        """
        from ingest.storage import storage_from_settings

        settings.ensure_var_dir()
        pool: dict[str, int] = {}
        if pool_size is not None and _pooled(settings.database_url):
            overflow = pool_size if max_overflow is None else max_overflow
            pool = {"pool_size": pool_size, "max_overflow": overflow}
        engine = make_engine(settings.database_url, ping_after_idle=ping_after_idle, **pool)
        if redis is None and settings.redis_url:
            from redis import Redis as RedisClient

            redis = RedisClient.from_url(
                settings.redis_url, socket_timeout=5, socket_connect_timeout=2
            )
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            storage=storage_from_settings(settings),
            redis=redis,
        )

    @cached_property
    def one_statement(self) -> Engine:
        """The engine for units of work that are one statement (see ``one_statement_engine``)."""
        return one_statement_engine(self.sessions)

    def close(self) -> None:
        self.engine.dispose()


def _pooled(database_url: str) -> bool:
    """A database whose engine keeps a queue of connections: a server, or a SQLite file (an
    in-memory SQLite database is one connection, shared)."""
    url = make_url(database_url)
    return url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:")
