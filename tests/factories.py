"""Small factories for rows; each returns a flushed ORM object."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from ingest import accounts
from ingest.models import Instance, MediaItem, MediaState, Provider, utcnow

_counter = itertools.count(1)


def make_instance(session: Session, **overrides: Any) -> Instance:
    n = next(_counter)
    values: dict[str, Any] = {
        "name": f"instance-{n}",
        "provider": Provider.CLOUD,
        "phone_number_id": f"10{n:08d}",
        "api_key": f"api-key-{n}",
        "app_secret": None,
        "verify_token": None,
        "webhook_secret_header": None,
        "webhook_secret": None,
        "account": accounts.DEFAULT_ACCOUNT,
    }
    values.update(overrides)
    return accounts.add_instance(session, accounts.InstanceSpec(**values))


def make_media_item(session: Session, instance: Instance, **overrides: Any) -> MediaItem:
    n = next(_counter)
    now = utcnow()
    values: dict[str, Any] = {
        "instance_id": instance.id,
        "message_id": f"wamid.TEST{n:010d}",
        "media_id": f"{n:015d}",
        "media_type": "image",
        "declared_mime": "image/jpeg",
        "received_at": now,
        "expires_at": now + timedelta(days=7),
        "next_attempt_at": now,
        "state": MediaState.PENDING,
    }
    values.update(overrides)
    item = MediaItem(**values)
    session.add(item)
    session.flush()
    return item
