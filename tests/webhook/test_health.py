from typing import Any

import pytest
from flask.testing import FlaskClient

from ingest.queues import RecordingScheduler
from ingest.services import Services
from ingest.settings import Settings
from webhook.app import create_app


class _Broker(RecordingScheduler):
    def __init__(self, up: bool) -> None:
        super().__init__()
        self.up = up

    def ping(self) -> None:
        if not self.up:
            raise ConnectionRefusedError("broker down")


def _client(services: Services, broker_up: bool = True) -> FlaskClient:
    return create_app(services=services, scheduler=_Broker(broker_up)).test_client()


def test_healthz_answers_without_touching_dependencies(services: Services) -> None:
    response = _client(services, broker_up=False).get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_names_every_dependency(services: Services) -> None:
    response = _client(services).get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "checks": {"database": "ok", "storage": "ok", "broker": "ok"},
    }


def test_readyz_is_503_and_names_the_broken_part(services: Services) -> None:
    response = _client(services, broker_up=False).get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["checks"]["broker"].startswith("error")
    assert body["checks"]["database"] == "ok"


def test_readyz_reports_an_unreachable_database(make_settings: Any) -> None:
    settings: Settings = make_settings(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    services = Services.from_settings(settings)
    try:
        response = _client(services).get("/readyz")
    finally:
        services.close()
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"].startswith("error")


def test_unknown_route_is_a_json_404(services: Services) -> None:
    response = _client(services).get("/nope")
    assert response.status_code == 404
    assert response.get_json() == {"success": False, "error": {"message": "Not found"}}


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics_are_exposed(services: Services, path: str) -> None:
    response = _client(services).get(path)
    assert response.status_code == 200
    assert b"ingest_webhook_requests_total" in response.data
