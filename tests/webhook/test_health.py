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


def test_a_broker_outage_is_reported_but_keeps_the_web_ready(services: Services) -> None:
    """Webhooks are still recorded without a broker (the reconciler wakes them later): a
    load balancer must not take the web out during a broker blip."""
    response = _client(services, broker_up=False).get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["broker"].startswith("error")
    assert body["checks"]["database"] == "ok"
    metrics = _client(services).get("/metrics").data.decode()
    assert 'ingest_dependency_up{dependency="database"} 1.0' in metrics


def test_a_hung_dependency_is_reported_as_a_timeout_within_the_probe_budget(
    services: Services,
) -> None:
    import time

    class Hung(_Broker):
        def ping(self) -> None:
            time.sleep(5)

    client = create_app(services=services, scheduler=Hung(True)).test_client()
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < 3  # not the 5 s the broker takes
    assert response.status_code == 200
    assert response.get_json()["checks"]["broker"] == "error: timeout"


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
