"""``ingest web``, ``worker`` and ``beat`` say at start which service does not answer, one
WARNING line each, and start anyway."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import dependencies, service
from cli.main import cli
from ingest.settings import load_settings

# Nothing listens on port 1 of the loopback: every connection is refused at once.
DEAD = {
    "INGEST_DATABASE_URL": "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/x",
    "INGEST_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0",
    "INGEST_REDIS_URL": "redis://:hunter2@127.0.0.1:1/1",
    "INGEST_STORAGE_URL": "s3://media/archive",
    "INGEST_S3_ENDPOINT_URL": "http://127.0.0.1:1",
}
NAMES = ("database", "broker", "storage", "redis")


@pytest.fixture
def var_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path / "var"))
    # These commands point prometheus at var/metrics for the whole process; not in tests.
    monkeypatch.setattr(service, "_configure_multiprocess_metrics", lambda _var_dir: None)
    return tmp_path / "var"


@pytest.fixture
def everything_down(var_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DEAD.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which process went on to start (gunicorn, Celery worker, Celery beat)."""
    calls: list[str] = []
    monkeypatch.setattr(
        "gunicorn.app.base.BaseApplication.run", lambda _self: calls.append("gunicorn")
    )

    class App:
        def worker_main(self, argv: list[str]) -> None:
            calls.append(argv[0])

        start = worker_main

    # Not the real tasks.worker: importing it builds its app from this test's environment.
    fake = types.ModuleType("tasks.worker")
    fake.app = App()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tasks.worker", fake)
    # The worker keeps its thread count in the environment for the runtime; undo it after.
    monkeypatch.setenv("INGEST_WORKER_CONCURRENCY", "2")
    return calls


def _startup_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == dependencies.__name__ and record.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("argv", "process"),
    [
        (["web", "--workers", "1"], "gunicorn"),
        (["worker", "--processes", "1", "--concurrency", "2"], "worker"),
        (["beat"], "beat"),
    ],
)
def test_each_unreachable_service_is_one_warning_and_the_process_starts_anyway(
    everything_down: None,
    started: list[str],
    caplog: pytest.LogCaptureFixture,
    argv: list[str],
    process: str,
) -> None:
    caplog.set_level(logging.WARNING)
    began = time.monotonic()

    result = CliRunner().invoke(cli, argv)

    assert result.exit_code == 0, result.output
    assert started == [process]
    warnings = _startup_warnings(caplog)
    assert len(warnings) == len(NAMES), warnings
    for name, line in zip(NAMES, warnings, strict=True):
        assert line.startswith(f"{argv[0]}: {name} unavailable ("), line
        assert "\n" not in line and "hunter2" not in line
    assert "connection refused" in warnings[0]
    # A couple of seconds at most, however many services are down.
    assert time.monotonic() - began < dependencies.CHECK_SECONDS + 4


def test_nothing_is_said_when_every_service_answers(
    var_dir: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert CliRunner().invoke(cli, ["db", "upgrade"]).exit_code == 0

    result = CliRunner().invoke(cli, ["beat"])

    assert result.exit_code == 0, result.output
    assert _startup_warnings(caplog) == []


def test_a_schema_behind_the_code_is_a_warning_too(
    var_dir: Path, started: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    CliRunner().invoke(cli, ["beat"])

    (line,) = _startup_warnings(caplog)
    assert "database unavailable" in line and "run `ingest db upgrade`" in line


def test_the_worker_checks_once_not_in_each_of_its_processes(
    var_dir: Path, monkeypatch: pytest.MonkeyPatch, started: list[str]
) -> None:
    checked: list[str] = []
    monkeypatch.setattr(service, "warn_unreachable", lambda _s, process: checked.append(process))

    class Child:
        def poll(self) -> int:
            return 0

    monkeypatch.setattr("cli.service.subprocess.Popen", lambda argv, env, **_: Child())
    monkeypatch.setattr("cli.service.time.sleep", lambda _seconds: None)
    assert CliRunner().invoke(cli, ["worker", "--processes", "2"]).exit_code == 0
    assert checked == ["worker"]

    # A child: started by `ingest worker` with a node name of its own.
    monkeypatch.setenv("INGEST_WORKER_NODE_NAME", "worker1@test")
    monkeypatch.setattr(service, "_end_with_parent", lambda: None)
    assert CliRunner().invoke(cli, ["worker", "--processes", "1"]).exit_code == 0
    assert checked == ["worker"]
    assert started == ["worker"]


@pytest.fixture
def hanging(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    release = threading.Event()

    def hang(_settings: Any, _timeout: float) -> str:
        release.wait(30)
        return "late"

    monkeypatch.setattr(
        dependencies,
        "dependencies",
        lambda _settings: [dependencies.Dependency("broker", "amqp://paused//", hang)],
    )
    yield release
    release.set()


def test_a_service_that_never_answers_delays_start_by_the_timeout_only(
    var_dir: Path, hanging: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    began = time.monotonic()

    failed = dependencies.warn_unreachable(load_settings(), "worker", timeout=0.2)

    assert time.monotonic() - began < 0.2 + 2
    assert [outcome.detail for outcome in failed] == ["no answer within 0.2 s"]
    assert _startup_warnings(caplog) == [
        "worker: broker unavailable (amqp://paused//): no answer within 0.2 s; "
        "starting anyway, it is used once it answers"
    ]


def test_before_celery_sets_logging_up_the_warning_still_reaches_stderr(
    var_dir: Path, hanging: threading.Event, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        dependencies.warn_unreachable(load_settings(), "beat", timeout=0.1)
    finally:
        root.handlers[:] = saved

    err = capsys.readouterr().err
    assert " WARNING " in err and "beat: broker unavailable (amqp://paused//)" in err
    assert dependencies.LOG.handlers == [] and dependencies.LOG.propagate


def test_a_missing_bucket_is_named(
    var_dir: Path, monkeypatch: pytest.MonkeyPatch, moto_server: Any, aws_credentials: Any
) -> None:
    monkeypatch.setenv("INGEST_STORAGE_URL", "s3://no-such-bucket/archive")
    monkeypatch.setenv("INGEST_S3_ENDPOINT_URL", moto_server.endpoint_url)

    (outcome,) = dependencies.check_dependencies(load_settings(), only=("storage",))

    assert not outcome.ok
    assert outcome.detail == "bucket 'no-such-bucket' does not exist (HeadBucket: 404)"


def test_an_existing_bucket_passes(
    var_dir: Path, monkeypatch: pytest.MonkeyPatch, moto_server: Any, s3_bucket: str
) -> None:
    monkeypatch.setenv("INGEST_STORAGE_URL", f"s3://{s3_bucket}/archive")
    monkeypatch.setenv("INGEST_S3_ENDPOINT_URL", moto_server.endpoint_url)

    (outcome,) = dependencies.check_dependencies(load_settings(), only=("storage",))

    assert outcome.ok, outcome.detail


def test_web_start_up_names_every_instance_that_accepts_unsigned_webhooks(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cli.dependencies import warn_unsigned_instances
    from ingest import migrate
    from ingest.db import make_engine, make_session_factory, session_scope
    from tests.factories import make_instance

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'unsigned.sqlite3'}")
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    with session_scope(make_session_factory(engine)) as session:
        make_instance(session, name="open-door", app_secret=None, allow_unsigned=True)
        make_instance(session, name="signed")
    engine.dispose()
    caplog.set_level(logging.WARNING)
    warn_unsigned_instances(settings)
    warned = [r.getMessage() for r in caplog.records if "UNSIGNED" in r.getMessage()]
    assert len(warned) == 1 and "open-door" in warned[0]
