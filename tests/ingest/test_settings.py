from pathlib import Path

import pytest

from ingest.settings import ConfigError, Settings, load_settings


def test_embedded_defaults_live_under_var(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'ingest.sqlite3'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.sqlite3'}"
    assert settings.storage_url == (tmp_path / "var" / "media").as_uri()
    assert settings.redis_url is None


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql+psycopg://db/ingest")
    monkeypatch.setenv("INGEST_MEDIA_HOSTS", "a.example, B.example")
    settings = load_settings()
    assert settings.database_url == "postgresql+psycopg://db/ingest"
    assert settings.media_hosts == ["a.example", "b.example"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INGEST_DATABASE_URL", "mysql://nope"),
        ("INGEST_STORAGE_URL", "ftp://host/x"),
        ("INGEST_STORAGE_URL", "s3:///no-bucket"),
        ("INGEST_GRAPH_URL", "not a url"),
        ("INGEST_REDIS_URL", "http://localhost"),
        ("INGEST_WEBHOOK_MAX_BYTES", "-1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message


# --- unknown INGEST_* variables ------------------------------------------------------------


def test_a_misspelt_variable_stops_with_one_line_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_DATABSE_URL", "postgresql+psycopg://db/ingest")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert "INGEST_DATABSE_URL" in message
    assert "did you mean INGEST_DATABASE_URL?" in message


def test_an_unknown_variable_with_no_close_setting_is_refused_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_FOO", "1")
    with pytest.raises(ConfigError, match="INGEST_FOO is not a known variable"):
        load_settings()


@pytest.mark.parametrize(
    "variable",
    [
        "INGEST_TEST_DATABASE_URL",
        "INGEST_TEST_SOMETHING_NEW",
        "INGEST_INSTANCE_API_KEY",
        "INGEST_WORKER_NODE_NAME",
        "INGEST_FAULTS_REPORT",
        "ingest_log_level",
    ],
)
def test_variables_read_outside_settings_are_accepted(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "DEBUG")
    load_settings()


REPOSITORY = Path(__file__).resolve().parents[2]
# Names the tests misspell on purpose, to see them refused.
DELIBERATE_TYPOS = {"INGEST_DATABSE_URL", "INGEST_FOO"}


def test_every_ingest_variable_the_repository_names_is_accepted() -> None:
    """A variable the project sets or documents must never stop a process as a typo."""
    import re

    from ingest.settings import check_environment

    sources = [REPOSITORY / name for name in ("README.md", "Makefile", "Procfile", "Procfile.dev")]
    for folder in ("ingest", "cli", "tasks", "webhook", "sandbox", "bench", "tests", "docs", ".ci"):
        sources += [p for p in (REPOSITORY / folder).rglob("*") if p.is_file()]
    named: set[str] = set()
    for path in sources:
        if path.exists() and path.suffix not in (".pyc", ".jpg", ".png", ".pdf", ".ogg", ".mp4"):
            text = path.read_text(errors="replace")
            named.update(re.findall(r"\bINGEST_[A-Z0-9_]*[A-Z0-9]\b", text))
    assert "INGEST_DATABASE_URL" in named and "INGEST_WORKER_NODE_NAME" in named
    check_environment(dict.fromkeys(named - DELIBERATE_TYPOS, "x"))


def test_the_suites_own_environment_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/conftest.py strips INGEST_* but for INGEST_TEST_*, which must stay accepted.
    monkeypatch.setenv("INGEST_TEST_REQUIRE_SERVICES", "0")
    load_settings()


# --- database and broker schemes that work ---------------------------------------------------


def test_plain_postgresql_is_driven_by_psycopg_3() -> None:
    from sqlalchemy.engine import make_url

    settings = Settings(database_url="postgresql://u@db/ingest")
    assert settings.database_url == "postgresql+psycopg://u@db/ingest"
    assert make_url(settings.database_url).get_dialect().driver == "psycopg"


def test_the_postgresql_broker_is_driven_by_psycopg_3() -> None:
    settings = Settings(broker_url="sqla+postgresql://u@db/broker")
    assert settings.broker_url == "sqla+postgresql+psycopg://u@db/broker"


def test_a_driver_that_is_not_installed_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name: None if name == "psycopg2" else find_spec(name)
    )
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql+psycopg2://u@db/ingest")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "INGEST_DATABASE_URL" in str(caught.value)
    assert "psycopg2 is not installed" in str(caught.value)


# --- URLs in messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:hunter2@db:5432/x", "postgresql+psycopg://u:***@db:5432/x"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("amqp://guest:p@ss@rabbit//", "amqp://guest:***@rabbit//"),
        ("postgresql+psycopg://db/x?password=hunter2&sslmode=require", None),
        ("sqlite:////var/lib/ingest.sqlite3", "sqlite:////var/lib/ingest.sqlite3"),
    ],
)
def test_hide_password(url: str, shown: str | None) -> None:
    from ingest.settings import hide_password

    hidden = hide_password(url)
    assert "hunter2" not in hidden and "p@ss" not in hidden
    if shown is not None:
        assert hidden == shown


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INGEST_API_RATE_LIMIT", "lots"),
        ("INGEST_AUTH_FAILURE_RATE_LIMIT", "0/minute"),
        ("INGEST_AUTH_FAILURE_GLOBAL_RATE_LIMIT", "1/second;5/minute"),
        ("INGEST_METRICS_TOKEN", " "),
    ],
)
def test_a_bad_limit_or_an_empty_token_is_one_line_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert variable in str(refused.value) and "\n" not in str(refused.value)


def test_a_worker_process_runs_its_threads_rows_side_by_side_only_on_the_threads_pool(
    tmp_path: Path,
) -> None:
    def side_by_side(pool: str) -> int:
        return Settings(var_dir=tmp_path, worker_concurrency=8, worker_pool=pool).rows_side_by_side

    assert side_by_side("threads") == 8
    # Each prefork child, solo process or greenlet runs one message at a time: its rows in turn.
    assert [side_by_side(pool) for pool in ("prefork", "solo", "gevent")] == [1, 1, 1]
