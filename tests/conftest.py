"""Shared fixtures.

Database and Redis fixtures are parametrised: every test that uses them runs on the fast
embedded part (SQLite, fakeredis) and, when ``INGEST_TEST_DATABASE_URL`` /
``INGEST_TEST_REDIS_URL`` are set, on the real service too. With
``INGEST_TEST_REQUIRE_SERVICES=1`` (CI) a missing service fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from ingest import migrate
from ingest.db import make_engine, make_session_factory
from ingest.models import Base
from ingest.services import Services
from ingest.settings import Settings

pytest_plugins = ["tests.plugins.s3", "tests.plugins.sandbox", "tests.plugins.processes"]

REQUIRE_SERVICES = os.environ.get("INGEST_TEST_REQUIRE_SERVICES") == "1"
TEST_DATABASE_URL = os.environ.get("INGEST_TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("INGEST_TEST_REDIS_URL")


def skip_or_fail(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own INGEST_* variables must not leak into the settings tests build."""
    for name in list(os.environ):
        if name.startswith("INGEST_") and not name.startswith("INGEST_TEST_"):
            monkeypatch.delenv(name)
    # `ingest web` and `ingest worker` set this in their own process, which for a command
    # invoked in-process is pytest's: set and deleted here, so monkeypatch removes it again
    # after the test whatever the test's command did.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "unset")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")


# --- databases -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrate once; each test gets a copy of the migrated file."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test session, so parallel runs never collide."""
    if not TEST_DATABASE_URL:
        skip_or_fail("INGEST_TEST_DATABASE_URL is not set (PostgreSQL tests)")
    assert TEST_DATABASE_URL is not None
    server = make_url(TEST_DATABASE_URL)
    name = f"ingest_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(server.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "not available"
        admin.dispose()
        skip_or_fail(f"PostgreSQL at INGEST_TEST_DATABASE_URL is unreachable: {exc}")
    url = server.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "ingest.sqlite3"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("_postgres_url")
    yield url
    _truncate(url)


def _truncate(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        conn.execute(text("INSERT INTO accounts (name, created_at) VALUES ('default', now())"))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """SQLite only, for tests that are about the embedded default."""
    path = tmp_path / "ingest.sqlite3"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


# --- redis -----------------------------------------------------------------------------


@pytest.fixture(params=["fakeredis", "redis"])
def redis_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A Redis client: fakeredis, and the real server when INGEST_TEST_REDIS_URL is set."""
    if request.param == "fakeredis":
        import fakeredis

        yield fakeredis.FakeRedis()
        return
    if not TEST_REDIS_URL:
        skip_or_fail("INGEST_TEST_REDIS_URL is not set (Redis tests)")
    import redis

    assert TEST_REDIS_URL is not None
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        skip_or_fail(f"Redis at INGEST_TEST_REDIS_URL is unreachable: {exc}")
    yield client
    client.close()


# Every Redis key this test session writes starts with this, so the session can delete its
# own keys at the end without touching those of another run sharing the server.
SESSION_KEY_PREFIX = f"ingest-test-{uuid.uuid4().hex[:6]}"


def unique_key_prefix() -> str:
    """A prefix of one test's own under this session's (see :data:`SESSION_KEY_PREFIX`)."""
    return f"{SESSION_KEY_PREFIX}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def _leave_no_redis_keys() -> Iterator[None]:
    """The suite leaves nothing behind in a shared Redis: queues, kombu's bindings, budgets."""
    yield
    if not TEST_REDIS_URL:
        return
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        for key in client.scan_iter(f"{SESSION_KEY_PREFIX}-*", count=1000):
            client.delete(key)
    except redis.RedisError:
        pass  # the server went away: nothing left to clean
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> str:
    """Keys of one test never meet another's, even on a shared real Redis."""
    return unique_key_prefix()


# --- settings and services ----------------------------------------------------------


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "var_dir": tmp_path / "var",
            "database_url": f"sqlite:///{tmp_path / 'unused.sqlite3'}",
            "broker_url": "memory://",
            "storage_url": (tmp_path / "media").as_uri(),
            "media_hosts": ["127.0.0.1", "localhost"],
            "redis_prefix": unique_key_prefix(),
        }
        values.update(overrides)
        if str(values["database_url"]).startswith("postgresql"):
            # A server database has no key file beside it: the tests' own key.
            from tests.factories import TEST_SECRET_KEY

            values.setdefault("secret_key", TEST_SECRET_KEY)
        return Settings(**values)

    return build


@pytest.fixture
def settings(make_settings: Any, database_url: str) -> Settings:
    result: Settings = make_settings(database_url=database_url)
    return result


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    built = Services.from_settings(settings)
    yield built
    built.close()


@pytest.fixture
def sessions(settings: Settings, request: pytest.FixtureRequest) -> Iterator[sessionmaker[Session]]:
    """Sessions on the test database; shares the engine of `services` when a test uses both."""
    if "services" in request.fixturenames:
        yield request.getfixturevalue("services").sessions
        return
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as s:
        yield s


@pytest.fixture
def session_factory_for() -> Any:
    """Build a session factory for an arbitrary URL (closed at teardown)."""
    engines = []

    def build(url: str) -> sessionmaker[Session]:
        engine = make_engine(url)
        engines.append(engine)
        return make_session_factory(engine)

    yield build
    for engine in engines:
        engine.dispose()


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Any:
    """A CLI runner whose `ingest` reads the test database (and its local storage)."""
    from click.testing import CliRunner

    from tests.factories import TEST_SECRET_KEY

    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("INGEST_DATABASE_URL", database_url)
    monkeypatch.setenv("INGEST_STORAGE_URL", (tmp_path / "media").as_uri())
    if not database_url.startswith("sqlite"):
        # A server database needs the key in every process; SQLite generates its own.
        monkeypatch.setenv("INGEST_SECRET_KEY", TEST_SECRET_KEY)
    return CliRunner()
