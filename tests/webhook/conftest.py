"""Fixtures for the receiver: an app on the parametrised database, instances, and payloads.

The payload builders are plain functions (importable by the parser and intake tests) that
produce bodies shaped like Meta's Cloud API webhooks.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import strategies as st
from sqlalchemy import func, select

from ingest.intake import SIGNATURE_HEADER, sign
from ingest.models import MediaItem
from ingest.queues import RecordingScheduler
from ingest.services import Services
from tests.factories import make_instance
from webhook.app import create_app

_ids = itertools.count(1)

MEDIA_FIELDS: dict[str, dict[str, Any]] = {
    "image": {"mime_type": "image/jpeg", "caption": "a photo"},
    "video": {"mime_type": "video/mp4", "caption": "a clip"},
    "audio": {"mime_type": "audio/ogg; codecs=opus", "voice": True},
    "document": {"mime_type": "application/pdf", "filename": "invoice.pdf", "caption": "pdf"},
    "sticker": {"mime_type": "image/webp", "animated": False},
}
HEX_SHA = "a" * 64


def sent_now() -> str:
    """A live delivery's ``timestamp``: the message was sent a moment ago (unix seconds)."""
    return str(int(time.time()))


def media_message(
    kind: str = "image", *, message_id: str | None = None, **fields: Any
) -> dict[str, Any]:
    """One inbound media message; ``fields`` override the media object's own fields."""
    n = next(_ids)
    media: dict[str, Any] = {"id": f"{n:015d}", "sha256": HEX_SHA, **MEDIA_FIELDS.get(kind, {})}
    media.update(fields)
    return {
        "from": "15551234567",
        "id": message_id or f"wamid.MSG{n:012d}",
        "timestamp": sent_now(),
        "type": kind,
        kind: media,
    }


def text_message() -> dict[str, Any]:
    n = next(_ids)
    return {
        "from": "15551234567",
        "id": f"wamid.TXT{n:012d}",
        "timestamp": sent_now(),
        "type": "text",
        "text": {"body": "hello"},
    }


def status_update() -> dict[str, Any]:
    return {"id": f"wamid.OUT{next(_ids):012d}", "status": "read", "timestamp": sent_now()}


def change(
    phone_number_id: str | None,
    messages: list[dict[str, Any]] | None = None,
    *,
    statuses: list[dict[str, Any]] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    value: dict[str, Any] = {"messaging_product": "whatsapp"}
    if phone_number_id is not None:
        value["metadata"] = {
            "display_phone_number": "15550001111",
            "phone_number_id": phone_number_id,
        }
    if messages is not None:
        value["contacts"] = [{"profile": {"name": "Ana"}, "wa_id": "15551234567"}]
        value["messages"] = messages
    if statuses is not None:
        value["statuses"] = statuses
    if errors is not None:
        value["errors"] = errors
    return {"field": "messages", "value": value}


def envelope(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    """A body whose changes are spread over ``entries`` entries (round robin)."""
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(entries)]
    for i, item in enumerate(changes):
        buckets[i % entries].append(item)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": f"WABA{i}", "changes": bucket} for i, bucket in enumerate(buckets)],
    }


def encode(document: Any) -> bytes:
    """Serialised the way Meta does it: compact, non-ASCII escaped."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode()


# --- hypothesis strategies: bodies that are mostly, but not always, well formed --------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-formed value, sometimes anything at all."""
    return st.integers(1, 8).flatmap(lambda n: json_values if n == 8 else strategy)


@st.composite
def webhook_documents(draw: st.DrawFn, phone_number_id: str) -> Any:
    kind = draw(
        st.sampled_from(["image", "video", "audio", "document", "sticker", "unsupported", "text"])
    )
    media = draw(
        maybe(
            st.fixed_dictionaries(
                {"id": maybe(st.text(min_size=1, max_size=300))},
                optional={
                    "mime_type": maybe(st.text(max_size=300)),
                    "sha256": maybe(st.text(max_size=70)),
                    "caption": maybe(st.text()),
                    "filename": maybe(st.text()),
                    "url": maybe(st.text()),
                    "voice": maybe(st.booleans()),
                    "file_size": maybe(st.integers()),
                },
            )
        )
    )
    message = draw(
        maybe(
            st.fixed_dictionaries(
                {
                    "id": maybe(st.text(min_size=1, max_size=300)),
                    "type": maybe(st.just(kind)),
                    # "unsupported" carries its own object, drawn below.
                    kind if kind != "unsupported" else "image": st.just(media),
                },
                optional={
                    "from": maybe(st.text(max_size=80)),
                    "timestamp": maybe(st.text(max_size=25) | st.integers()),
                    "errors": maybe(
                        st.lists(
                            maybe(
                                st.fixed_dictionaries(
                                    {"code": maybe(st.integers()), "title": maybe(st.text())}
                                )
                            )
                        )
                    ),
                    "unsupported": maybe(
                        st.fixed_dictionaries({"type": maybe(st.sampled_from(["image", "poll"]))})
                    ),
                },
            )
        )
    )
    value = draw(
        maybe(
            st.fixed_dictionaries(
                {
                    "metadata": maybe(
                        st.fixed_dictionaries({"phone_number_id": maybe(st.just(phone_number_id))})
                    ),
                    "messages": maybe(st.lists(st.just(message), min_size=1, max_size=2)),
                },
                optional={
                    "statuses": maybe(st.lists(json_values, max_size=2)),
                    "contacts": maybe(st.lists(st.dictionaries(st.text(max_size=5), json_values))),
                    "errors": maybe(st.lists(json_values, max_size=2)),
                },
            )
        )
    )
    change_doc = draw(
        maybe(
            st.fixed_dictionaries(
                {"value": st.just(value)}, optional={"field": maybe(st.just("messages"))}
            )
        )
    )
    entry = draw(
        maybe(
            st.fixed_dictionaries(
                {"changes": maybe(st.lists(st.just(change_doc), min_size=1, max_size=2))}
            )
        )
    )
    return draw(
        maybe(
            st.fixed_dictionaries(
                {"entry": maybe(st.lists(st.just(entry), min_size=1, max_size=2))},
                optional={"object": maybe(st.just("whatsapp_business_account"))},
            )
        )
    )


@dataclass(frozen=True)
class TestInstance:
    __test__ = False  # not a test class, despite the name

    id: int
    name: str
    phone_number_id: str
    app_secret: str | None
    verify_token: str | None


@pytest.fixture
def scheduler() -> RecordingScheduler:
    return RecordingScheduler()


@pytest.fixture
def app(services: Services, scheduler: RecordingScheduler) -> Flask:
    return create_app(services=services, scheduler=scheduler)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def add_instance(services: Services) -> Any:
    def build(**overrides: Any) -> TestInstance:
        values: dict[str, Any] = {"app_secret": "app-secret", "verify_token": "verify-me"}
        values.update(overrides)
        with services.sessions.begin() as session:
            row = make_instance(session, **values)
            return TestInstance(
                id=row.id,
                name=row.name,
                phone_number_id=row.phone_number_id,
                # The row keeps only an encrypted secret and a hashed token: the plain values
                # are the ones given.
                app_secret=values.get("app_secret"),
                verify_token=values.get("verify_token"),
            )

    return build


@pytest.fixture
def instance(add_instance: Any) -> TestInstance:
    result: TestInstance = add_instance()
    return result


@pytest.fixture
def post(client: FlaskClient) -> Any:
    """POST raw bytes, signed with ``secret`` unless ``signature`` is given explicitly."""

    def send(
        body: bytes,
        *,
        secret: str | None = "app-secret",
        path: str = "/webhook",
        signature: str | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        all_headers = dict(headers or {})
        if signature is not None:
            all_headers[SIGNATURE_HEADER] = signature
        elif secret is not None:
            all_headers[SIGNATURE_HEADER] = sign(body, secret)
        return client.post(path, data=body, headers=all_headers, content_type=content_type)

    return send


@pytest.fixture
def count_rows(services: Services) -> Any:
    def count() -> int:
        with services.sessions() as session:
            return session.scalar(select(func.count()).select_from(MediaItem)) or 0

    return count


@pytest.fixture
def rows(services: Services) -> Any:
    def fetch() -> list[MediaItem]:
        with services.sessions() as session:
            return list(session.scalars(select(MediaItem).order_by(MediaItem.id)))

    return fetch
