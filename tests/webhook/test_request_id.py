"""Every web request has an id: the client's if it is a safe token, else ours; it is echoed
in the answer and carried by every log line written while the request runs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ingest import logs
from webhook.app import REQUEST_ID_HEADER

LOGGER = "tests.webhook.request_id"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def logging_client(app: Flask) -> FlaskClient:
    def speak() -> str:
        logging.getLogger(LOGGER).info("inside the request")
        return "ok"

    app.add_url_rule("/test-logs", "test_logs", speak)
    return app.test_client()


def test_a_safe_request_id_is_echoed(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={REQUEST_ID_HEADER: "abc-123.4_x:y"})
    assert response.headers[REQUEST_ID_HEADER] == "abc-123.4_x:y"


@pytest.mark.parametrize(
    "header",
    ["", "a" * 65, "has space", "line\u2028break", 'quote"d', "{json}", "évé"],
)
def test_an_unsafe_request_id_is_replaced(client: FlaskClient, header: str) -> None:
    response = client.get("/healthz", headers={REQUEST_ID_HEADER: header})
    echoed = response.headers[REQUEST_ID_HEADER]
    assert echoed != header
    assert logs.request_id_from(echoed) == echoed


def test_a_request_without_id_gets_a_fresh_one(client: FlaskClient) -> None:
    first = client.get("/healthz").headers[REQUEST_ID_HEADER]
    second = client.get("/healthz").headers[REQUEST_ID_HEADER]
    assert len(first) == 32
    assert first != second


def test_error_answers_carry_the_id_too(client: FlaskClient) -> None:
    response = client.get("/no-such-page", headers={REQUEST_ID_HEADER: "req-404"})
    assert response.status_code == 404
    assert response.headers[REQUEST_ID_HEADER] == "req-404"


def test_log_lines_during_the_request_carry_its_id(
    logging_client: FlaskClient, lines: _Lines
) -> None:
    response = logging_client.get("/test-logs", headers={REQUEST_ID_HEADER: "req-42"})
    assert response.status_code == 200
    assert [json.loads(line)["request_id"] for line in lines.lines] == ["req-42"]
    # Outside a request the id is gone.
    assert logs.REQUEST_ID.get() is None
    logging.getLogger(LOGGER).info("after the request")
    assert "request_id" not in json.loads(lines.lines[-1])
