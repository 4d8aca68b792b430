"""``/openapi.json`` describes the live app: every route, and every answer a fuzzer can get."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingest import accounts
from ingest.media_rules import object_key
from ingest.models import MediaState, utcnow
from ingest.queues import RecordingScheduler
from ingest.services import Services
from tests.factories import make_instance, make_media_item
from webhook.app import create_app

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Bounded so the whole fuzz stays well under 20 s on a 2-core machine.
FUZZ_EXAMPLES = 120


@dataclass
class Live:
    app: Flask
    instance: str
    token: str
    stored: str
    pending: str


@pytest.fixture
def live(make_settings: Any, sqlite_url: str) -> Iterator[Live]:
    services = Services.from_settings(
        make_settings(database_url=sqlite_url, api_rate_limit="100000/minute")
    )
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    digest = hashlib.sha256(data).hexdigest()
    with services.sessions.begin() as session:
        instance = make_instance(session, app_secret="app-secret", verify_token="verify-me")
        token = accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)
        key = object_key(instance.name, "image", "fuzz")
        stored = make_media_item(
            session,
            instance,
            state=MediaState.STORED,
            storage_key=key,
            size=len(data),
            actual_sha256=digest,
            actual_mime="image/png",
            stored_at=utcnow(),
        ).message_id
        pending = make_media_item(session, instance).message_id
        name = instance.name
    services.storage.put(key, io.BytesIO(data), size=len(data), sha256=digest, content_type="x")
    app = create_app(services=services, scheduler=RecordingScheduler())
    yield Live(app, name, token, stored, pending)
    services.close()


def served_document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.get_json()
    return document


def test_document_is_valid_openapi_3_1(live: Live) -> None:
    document = served_document(live.app)
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # raises on any violation of the OpenAPI 3.1 meta-schema


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_every_route_of_the_app_is_described(live: Live) -> None:
    paths = served_document(live.app)["paths"]
    served = {
        (_openapi_path(rule.rule), method.lower())
        for rule in live.app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    described = {(path, method) for path, item in paths.items() for method in item}
    assert served - described == set(), "routes missing from /openapi.json"
    assert described - served == set(), "documented routes the app does not serve"


def test_the_seed_contract_is_in_the_document(live: Live) -> None:
    document = served_document(live.app)
    success = document["components"]["schemas"]["Base64Media"]
    assert set(success["required"]) == {
        "success",
        "message",
        "message_id",
        "mime_type",
        "media_type",
        "base64",
    }
    assert success["properties"]["media_type"]["enum"] == [
        "image",
        "video",
        "audio",
        "document",
        "sticker",
    ]
    responses = document["paths"]["/api/chat/base64/{instance}"]["get"]["responses"]
    assert {"200", "400", "401", "404", "429", "503"} <= set(responses)
    # `token`, or `Authorization` (bare, or with the Bearer scheme).
    schemes = document["components"]["securitySchemes"]
    offered = document["paths"]["/api/chat/base64/{instance}"]["get"]["security"]
    assert {(s.get("in"), s.get("name"), s.get("scheme")) for s in schemes.values()} == {
        ("header", "token", None),
        (None, None, "bearer"),
        ("header", "Authorization", None),
    }
    assert {name for requirement in offered for name in requirement} == set(schemes)


def _fuzz(live: Live, **fixed: Any) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", live.app)
    strategy = schema.as_strategy(headers={"token": live.token}, **fixed)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


def test_fuzzing_finds_no_server_error_and_no_schema_violation(live: Live) -> None:
    _fuzz(live)


def test_fuzzing_the_stored_message_conforms_too(live: Live) -> None:
    # Fixed to a real row, so the fuzzer reaches the 200/206/304/416 answers as well.
    _fuzz(live, path_parameters={"instance": live.instance}, query={"messageId": live.stored})


def test_validators_are_documented_only_where_they_are_honoured(live: Live) -> None:
    document = served_document(live.app)
    client = live.app.test_client()
    headers = {"token": live.token}
    checked = set()
    for path, item in document["paths"].items():
        if not path.startswith("/api/chat/") or "{instance}" not in path:
            continue
        operation = item["get"]
        documented = any(p["name"] == "If-None-Match" for p in operation["parameters"])
        assert documented == ("304" in operation["responses"]), operation["operationId"]
        url = path.replace("{instance}", live.instance) + f"?messageId={live.stored}"
        first = client.get(url, headers=headers, buffered=True)
        assert first.status_code == 200
        etag = first.headers.get("ETag")
        if documented:
            assert etag is not None, operation["operationId"]
            again = client.get(url, headers={**headers, "If-None-Match": etag}, buffered=True)
            assert again.status_code == 304, operation["operationId"]
        else:
            # Nothing to revalidate with: the caller is not led to expect a 304.
            assert etag is None, operation["operationId"]
        checked.add((operation["operationId"], documented))
    assert checked == {("base64", True), ("findMessage", False), ("media", True)}


def test_every_archive_503_is_documented_with_retry_after(live: Live) -> None:
    paths = served_document(live.app)["paths"]
    for segment in ("base64", "find-message", "media"):
        unavailable = paths[f"/api/chat/{segment}/{{instance}}"]["get"]["responses"]["503"]
        assert "Retry-After" in unavailable["headers"]


def test_every_archive_answer_documents_the_rate_limit_headers(live: Live) -> None:
    paths = served_document(live.app)["paths"]
    seen = 0
    for path, item in paths.items():
        if not path.startswith("/api/chat/"):
            continue
        for status, response in item["get"]["responses"].items():
            headers = response.get("headers", {})
            for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
                assert name in headers, (path, status, name)
                assert headers[name]["required"] is True
            assert "epoch" in headers["X-RateLimit-Reset"]["description"]
            seen += 1
    assert seen > 20


def test_message_id_is_never_empty_wherever_it_is_a_parameter(live: Live) -> None:
    seen = 0
    for path, item in served_document(live.app)["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "messageId":
                    assert parameter["schema"]["minLength"] == 1, (path, method)
                    seen += 1
    # Three reading routes and the erasure, each with and without an instance segment (and "/").
    assert seen == 12


def test_exposure_is_documented(live: Live) -> None:
    document = served_document(live.app)
    description = document["info"]["description"]
    for promise in ("/readyz", "/metrics", "INGEST_METRICS_TOKEN", "access key id"):
        assert promise in description, promise
    paths = document["paths"]
    assert "Unauthenticated" in paths["/readyz"]["get"]["description"]
    media = paths["/api/chat/media/{instance}"]["get"]
    redirect = next(p for p in media["parameters"] if p["name"] == "redirect")
    assert "access key id" in redirect["description"]
    assert "X-Amz-Credential" in media["responses"]["302"]["description"]
    assert "bytes=-0" in media["responses"]["416"]["description"]


def test_a_metrics_token_is_documented_and_its_401_conforms(
    make_settings: Any, sqlite_url: str
) -> None:
    services = Services.from_settings(
        make_settings(database_url=sqlite_url, metrics_token="scrape-me")
    )
    try:
        app = create_app(services=services, scheduler=RecordingScheduler())
        schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
        operation = schema["/metrics"]["GET"]
        # No credentials (no token configured), or the bearer token.
        assert operation.definition.raw["security"] == [{}, {"bearer": []}]
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer nope"}, 401),
            ({"Authorization": "Bearer scrape-me"}, 200),
        ):
            case = operation.Case(headers=headers)
            response = case.call()
            assert response.status_code == status
            case.validate_response(response, checks=CHECKS)
    finally:
        services.close()


def test_answers_that_cannot_be_rate_limited_document_no_429(live: Live) -> None:
    paths = served_document(live.app)["paths"]
    for segment in ("base64", "find-message", "media"):
        for suffix in ("", "/"):
            responses = paths[f"/api/chat/{segment}{suffix}"]["get"]["responses"]
            assert set(responses) == {"400"}, (segment, suffix)
