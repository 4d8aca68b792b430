"""Small factories for rows; each returns a flushed ORM object."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ingest import accounts
from ingest.models import Instance, MediaItem, MediaState, Provider, utcnow
from ingest.secrets import SecretBox, secret_box_for

_counter = itertools.count(1)

# INGEST_SECRET_KEY of the tests on a server database (make_settings should pass it for
# them): there every process must be given the key, as in production.
TEST_SECRET_KEY = "RiVEH15KTd_IaQY-kwbo8laYBF8mE6RJFdJdEZOcHgQ="


def box_for_session(session: Session) -> SecretBox:
    """The box the code under test uses with the tests' settings for this session's
    database: on SQLite the key generated beside the file (make_settings sets no key), on a
    server database TEST_SECRET_KEY."""
    url = session.get_bind().engine.url
    rendered = url.render_as_string(hide_password=False)
    if url.get_backend_name() == "sqlite":
        return secret_box_for(rendered, None, Path("var"))
    return secret_box_for(rendered, TEST_SECRET_KEY, Path("var"))


def make_instance(session: Session, **overrides: Any) -> Instance:
    """An instance with secrets (an app secret unless told otherwise). Asked explicitly for
    no webhook check at all (``app_secret=None`` and no webhook secret), it is one whose
    operator allowed unsigned webhooks: the test is about those.

    The returned row also carries the secrets as given (``api_key``, ``app_secret``,
    ``verify_token``, ``webhook_secret``; plain attributes, never stored), for tests that
    sign webhooks or tell the sandbox the key. ``box=`` overrides :func:`box_for_session`.
    """
    n = next(_counter)
    box = overrides.pop("box", None) or box_for_session(session)
    values: dict[str, Any] = {
        "name": f"instance-{n}",
        "provider": Provider.CLOUD,
        "phone_number_id": f"10{n:08d}",
        "api_key": f"api-key-{n}",
        "app_secret": f"app-secret-{n}",
        "verify_token": None,
        "webhook_secret_header": None,
        "webhook_secret": None,
        "account": accounts.DEFAULT_ACCOUNT,
    }
    values.update(overrides)
    if "allow_unsigned" not in overrides:
        values["allow_unsigned"] = not (values["app_secret"] or values["webhook_secret"])
    row = accounts.add_instance(session, accounts.InstanceSpec(**values), box)
    plain = {
        "api_key": values["api_key"],
        "app_secret": values["app_secret"],
        "webhook_secret": values["webhook_secret"],
    }
    for name, value in plain.items():
        setattr(row, name, value)
    return row


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
