"""A service that is down, a database that does not exist, a bad setting: one line, not a
traceback (``ingest --debug`` shows the traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from cli.main import cli, one_line_error
from tests.conftest import TEST_DATABASE_URL, skip_or_fail

# Port 1 on the loopback: nothing listens there, a connection is refused at once.
DEAD_DATABASE = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x"
INGEST = Path(sys.executable).parent / "ingest"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path / "var"))
    return CliRunner()


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("argv", [["instance", "list"], ["db", "upgrade"], ["media", "list"]])
def test_a_database_that_is_down_is_one_line_naming_it(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.setenv("INGEST_DATABASE_URL", DEAD_DATABASE)

    result = runner.invoke(cli, argv)

    assert result.exit_code == 1
    line = _one_line(result.output)
    assert line == (
        "ingest: database unavailable (postgresql+psycopg://postgres:***@127.0.0.1:1/x): "
        "connection refused"
    )
    assert "hunter2" not in result.output


def test_debug_shows_the_traceback(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    monkeypatch.setenv("INGEST_DATABASE_URL", DEAD_DATABASE)

    for flag in ("--debug", "-v"):
        result = runner.invoke(cli, [flag, "instance", "list"])
        assert result.exit_code == 1
        assert isinstance(result.exception, OperationalError)


def test_a_database_that_does_not_exist_is_one_line(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not TEST_DATABASE_URL:
        skip_or_fail("INGEST_TEST_DATABASE_URL is not set (PostgreSQL tests)")
    assert TEST_DATABASE_URL is not None
    missing = make_url(TEST_DATABASE_URL).set(database="ingest_no_such_database")
    monkeypatch.setenv("INGEST_DATABASE_URL", missing.render_as_string(hide_password=False))

    result = runner.invoke(cli, ["instance", "list"])

    assert result.exit_code == 1
    line = _one_line(result.output)
    assert line.startswith("ingest: database unavailable (")
    assert line.endswith('database "ingest_no_such_database" does not exist')


def test_a_database_without_the_schema_says_to_migrate(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INGEST_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.sqlite3'}")

    result = runner.invoke(cli, ["instance", "list"])

    assert result.exit_code == 1
    assert _one_line(result.output) == (
        f"ingest: database error (sqlite:///{tmp_path / 'empty.sqlite3'}): "
        "no such table: instances; run `ingest db upgrade`"
    )


def test_the_installed_command_prints_one_line_and_fails(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_VAR_DIR"] = str(tmp_path / "var")
    env["INGEST_DATABASE_URL"] = DEAD_DATABASE

    done = subprocess.run(
        [str(INGEST), "instance", "list"], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1
    assert _one_line(done.stderr).startswith("ingest: database unavailable (")
    assert done.stdout == ""


def test_a_misspelt_variable_stops_the_command_naming_the_right_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_VAR_DIR"] = str(tmp_path / "var")
    env["INGEST_DATABSE_URL"] = "postgresql+psycopg://db/ingest"

    done = subprocess.run(
        [str(INGEST), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 2
    line = _one_line(done.stderr)
    assert "INGEST_DATABSE_URL" in line and "INGEST_DATABASE_URL" in line
    assert not (tmp_path / "var" / "ingest.sqlite3").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg2://postgres@127.0.0.1/x", "psycopg2 is not installed"),
        ("mysql://u@h/x", "scheme 'mysql' is not one of"),
    ],
)
def test_a_database_url_that_cannot_work_is_refused_in_one_line(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, url: str, shown: str
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name: None if name == "psycopg2" else find_spec(name)
    )
    monkeypatch.setenv("INGEST_DATABASE_URL", url)

    result = runner.invoke(cli, ["instance", "list"])

    assert result.exit_code == 2
    assert shown in _one_line(result.output)


# --- each kind of failure, one line --------------------------------------------------------


def _redis_error() -> Exception:
    from redis.exceptions import ConnectionError as RedisConnectionError

    return RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def _broker_error() -> Exception:
    from kombu.exceptions import OperationalError

    return OperationalError("[Errno 111] Connection refused")


def _storage_error() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:1/media")


@pytest.mark.parametrize(
    ("make_error", "expected"),
    [
        (
            _redis_error,
            "redis unavailable (redis://:***@127.0.0.1:1/0): "
            "error 111 connecting to 127.0.0.1:1. Connection refused",
        ),
        (_broker_error, "broker unavailable (amqp://guest:***@127.0.0.1:2//): [Errno 111]"),
        (_storage_error, "storage unavailable (s3://media/archive): could not connect"),
    ],
)
def test_every_service_failure_is_one_line_naming_the_service(
    monkeypatch: pytest.MonkeyPatch, make_error: object, expected: str
) -> None:
    monkeypatch.setenv("INGEST_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("INGEST_BROKER_URL", "amqp://guest:hunter2@127.0.0.1:2//")
    monkeypatch.setenv("INGEST_STORAGE_URL", "s3://media/archive")
    assert callable(make_error)

    found = one_line_error(make_error())

    assert found is not None
    message, status = found
    assert message.startswith(expected)
    assert status == 1
    assert "\n" not in message and "hunter2" not in message


def test_the_redis_that_failed_is_the_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    monkeypatch.setenv("INGEST_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("INGEST_BROKER_URL", "redis://127.0.0.1:2/0")

    found = one_line_error(RedisConnectionError("Error 111 connecting to 127.0.0.1:2. Refused."))

    assert found is not None
    assert "(redis://127.0.0.1:2/0)" in found[0]


def test_a_bug_keeps_its_traceback() -> None:
    assert one_line_error(KeyError("oops")) is None
    assert one_line_error(ModuleNotFoundError("No module named 'psycopg2'")) is None
