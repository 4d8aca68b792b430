from collections.abc import Iterator
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


# --- /metrics with INGEST_METRICS_TOKEN ----------------------------------------------------


@pytest.fixture
def guarded_metrics(make_settings: Any, sqlite_url: str) -> Iterator[FlaskClient]:
    settings: Settings = make_settings(database_url=sqlite_url, metrics_token="scrape-me")
    services = Services.from_settings(settings)
    yield _client(services)
    services.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer scrape-me-not"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic c2NyYXBlLW1l"},
        {"Authorization": "scrape-me"},
        {"token": "scrape-me"},
    ],
)
def test_metrics_require_the_token_when_one_is_set(
    guarded_metrics: FlaskClient, headers: dict[str, str]
) -> None:
    response = guarded_metrics.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {
        "success": False,
        "error": {"message": "Invalid metrics token"},
    }
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"ingest_" not in response.data


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_metrics_answer_the_token(guarded_metrics: FlaskClient, scheme: str) -> None:
    response = guarded_metrics.get("/metrics", headers={"Authorization": f"{scheme} scrape-me"})
    assert response.status_code == 200
    assert b"ingest_webhook_requests_total" in response.data


def test_the_metrics_token_is_compared_in_constant_time(
    guarded_metrics: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    from webhook import metrics as metrics_view

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(metrics_view.hmac, "compare_digest", spy)
    guarded_metrics.get("/metrics", headers={"Authorization": "Bearer scrape"})
    # Equal-length digests, so not even the token's length shows.
    assert len(compared) == 1 and len(compared[0][0]) == len(compared[0][1]) == 32


def test_metrics_declare_their_content_type_once(services: Services) -> None:
    from prometheus_client import CONTENT_TYPE_LATEST

    response = _client(services).get("/metrics")
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert response.headers["Content-Type"].count("charset") == 1
