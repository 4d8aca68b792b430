"""Log formats: text stays the default line, json gives one object per line with context."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from ingest import logs
from ingest.settings import Settings


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _record(message: str = "stored %s", *args: object) -> logging.LogRecord:
    return logging.LogRecord(
        "ingest.pipeline", logging.INFO, __file__, 1, message, args or ("x",), None
    )


def test_json_is_one_object_per_line_with_the_fields() -> None:
    line = logs.JsonFormatter().format(_record("stored %s", "item"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "ingest.pipeline"
    assert entry["message"] == "stored item"
    assert isinstance(entry["process"], int)
    assert entry["time"].endswith("+00:00")
    assert not {"request_id", "task_id", "media_item_id"} & entry.keys()


def test_json_carries_the_task_context_while_it_is_set() -> None:
    formatter = logs.JsonFormatter()
    with logs.task_context("task-1", 42):
        entry = json.loads(formatter.format(_record()))
    assert entry["task_id"] == "task-1"
    assert entry["media_item_id"] == 42
    after = json.loads(formatter.format(_record()))
    assert "task_id" not in after
    assert "media_item_id" not in after


def test_json_carries_the_request_id() -> None:
    token = logs.REQUEST_ID.set("req-1")
    try:
        entry = json.loads(logs.JsonFormatter().format(_record()))
    finally:
        logs.REQUEST_ID.reset(token)
    assert entry["request_id"] == "req-1"


def test_line_breaks_and_tracebacks_stay_inside_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "bad\r\ninput\x1b[31m", None, sys.exc_info()
        )
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    entry = json.loads(line)
    assert entry["message"] == "bad\r\ninput\x1b[31m"
    assert "ValueError: boom" in entry["exc_info"]


def test_text_format_is_unchanged() -> None:
    formatter = logs.formatter("text")
    assert formatter._fmt == "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    with logs.task_context("task-1", 42):
        line = formatter.format(_record("stored %s", "item"))
    assert line.endswith(f" INFO {_record().process} ingest.pipeline: stored item")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        logs.formatter("xml")


@pytest.mark.usefixtures("root_restored")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_configure_installs_one_root_handler_and_keeps_others(log_format: str) -> None:
    root = logging.getLogger()
    # pytest's capture: someone else's, left in place (an earlier test's own may be there too)
    others = [h for h in root.handlers if not getattr(h, "_ingest_log_handler", False)]
    logs.configure("WARNING", log_format)
    logs.configure("WARNING", log_format)  # again: ours is replaced, not doubled
    ours = [h for h in root.handlers if h not in others]
    assert len(ours) == 1 and all(h in root.handlers for h in others)
    assert root.level == logging.WARNING
    stream = io.StringIO()
    handler = ours[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("ingest.test").warning("hello")
    out = stream.getvalue()
    if log_format == "json":
        assert json.loads(out)["message"] == "hello"
    else:
        assert out.rstrip().endswith("ingest.test: hello")


def test_the_setting_defaults_to_text_and_accepts_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.model_fields["log_format"].default == "text"
    monkeypatch.setenv("INGEST_LOG_FORMAT", "JSON")
    assert Settings().log_format == "json"
    monkeypatch.setenv("INGEST_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="text or json"):
        Settings()


@pytest.mark.usefixtures("root_restored")
def test_gunicorn_error_log_is_json_and_its_access_line_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gunicorn.config import Config

    from cli.service import ACCESS_LOG_FORMAT, gunicorn_log_config
    from cli.web_hardening import EscapingLogger

    assert gunicorn_log_config("INFO", "text") is None
    config = Config()
    config.set("accesslog", "-")
    config.set("access_log_format", ACCESS_LOG_FORMAT)
    config.set("logconfig_dict", gunicorn_log_config("INFO", "json"))
    logger = EscapingLogger(config)
    try:
        logger.error_log.info("Booting worker with pid: %s", 7)
        logger.access_log.info('1.2.3.4 "GET /healthz HTTP/1.1" 200 2 1ms')
        logging.getLogger("webhook.receiver").info("received")
        captured = capsys.readouterr()
    finally:
        for name in ("gunicorn.error", "gunicorn.access"):
            for handler in logging.getLogger(name).handlers[:]:
                logging.getLogger(name).removeHandler(handler)
    errors = [json.loads(line) for line in captured.err.splitlines()]
    assert [(e["logger"], e["message"]) for e in errors] == [
        ("gunicorn.error", "Booting worker with pid: 7"),
        ("webhook.receiver", "received"),
    ]
    assert captured.out == '1.2.3.4 "GET /healthz HTTP/1.1" 200 2 1ms\n'
