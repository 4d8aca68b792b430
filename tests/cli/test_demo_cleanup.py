"""``ingest demo``'s own rows: a token with its own limit, verification handed each item as it
is stored, and the instance removed afterwards with its rows and objects (``remove_instance``).
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cli import demo, demo_summary, demo_verify
from ingest import accounts
from ingest.models import ApiToken, Instance, MediaItem, MediaState, Provider, utcnow
from ingest.settings import Settings
from ingest.storage import MemoryStorage, storage_from_settings
from sandbox import registration
from sandbox.provider import SandboxMedia
from tests.factories import make_instance, make_media_item


def _store(storage: Any, key: str, data: bytes = b"media bytes") -> None:
    storage.put(
        key,
        io.BytesIO(data),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type="image/jpeg",
    )


def _count(session: Session, model: Any) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


# --- remove_instance ------------------------------------------------------------------------


def test_remove_instance_refuses_an_instance_with_media_unless_purged(session: Session) -> None:
    shop = make_instance(session, name="shop")
    make_media_item(session, shop, state=MediaState.STORED, storage_key="shop/a.jpg")
    storage = MemoryStorage()
    _store(storage, "shop/a.jpg")

    with pytest.raises(accounts.RegistryError, match="1 media row"):
        accounts.remove_instance(session, storage, "shop", purge=False)
    assert accounts.find_instance(session, "shop") is not None
    assert storage.keys() == ["shop/a.jpg"]


def test_remove_instance_without_media_needs_no_purge(session: Session) -> None:
    make_instance(session, name="quiet")
    accounts.create_token(session, instance="quiet")
    removed = accounts.remove_instance(session, MemoryStorage(), "quiet", purge=False)
    assert (removed.media_rows, removed.objects, removed.tokens) == (0, 0, 1)
    assert accounts.find_instance(session, "quiet") is None
    with pytest.raises(accounts.RegistryError, match="no instance"):
        accounts.remove_instance(session, MemoryStorage(), "quiet", purge=False)


def test_purge_removes_rows_objects_and_own_tokens_and_nothing_else(session: Session) -> None:
    shop = make_instance(session, name="shop")
    other = make_instance(session, name="other")
    storage = MemoryStorage()
    for n in range(3):
        make_media_item(session, shop, state=MediaState.STORED, storage_key=f"shop/{n}.jpg")
        _store(storage, f"shop/{n}.jpg", bytes([n]) * 10)
    make_media_item(session, shop, state=MediaState.FAILED, failure_reason="provider_error")
    make_media_item(session, other, state=MediaState.STORED, storage_key="other/0.jpg")
    _store(storage, "other/0.jpg")
    accounts.create_token(session, instance="shop")
    accounts.create_token(session, instance="other")
    accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)

    removed = accounts.remove_instance(session, storage, "shop", purge=True)

    assert (removed.media_rows, removed.objects, removed.tokens) == (4, 3, 1)
    assert storage.keys() == ["other/0.jpg"]
    assert accounts.find_instance(session, "shop") is None
    assert [i.name for i in accounts.list_instances(session)] == ["other"]
    assert _count(session, MediaItem) == 1
    scopes = sorted(t.scope for t in accounts.list_tokens(session))
    assert scopes == ["account default", "instance other"]


# --- the demo's registration: its token, its removal ----------------------------------------


@pytest.fixture
def demo_settings(make_settings: Any, database_url: str) -> Settings:
    result: Settings = make_settings(database_url=database_url)
    result.ensure_var_dir()
    return result


def test_the_demo_token_has_its_own_rate_limit(demo_settings: Settings, session: Session) -> None:
    reg = registration.register(demo_settings, Provider.CLOUD, rate_limit=demo.DEMO_RATE_LIMIT)
    row = session.scalar(
        select(ApiToken).where(ApiToken.token_hash == accounts.hash_secret(reg.token))
    )
    assert row is not None and row.rate_limit == "100000/minute"


def test_the_demo_removes_its_instance_token_rows_and_objects(
    demo_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    reg = registration.register(demo_settings, Provider.CLOUD, rate_limit=demo.DEMO_RATE_LIMIT)
    storage = storage_from_settings(demo_settings)
    with sessions.begin() as session:
        instance = accounts.get_instance(session, reg.instance)
        for n in range(2):
            key = f"{reg.instance}/{n}.jpg"
            make_media_item(session, instance, state=MediaState.STORED, storage_key=key)
            _store(storage, key)

    removed = registration.remove_registration(demo_settings, reg)

    assert (removed.media_rows, removed.objects, removed.tokens) == (2, 2, 0)  # token revoked
    with sessions() as session:
        assert _count(session, Instance) == 0
        assert _count(session, MediaItem) == 0
        assert _count(session, ApiToken) == 0
    media_root = Path(demo_settings.storage_url.removeprefix("file://"))
    assert [p for p in media_root.rglob("*") if p.is_file()] == []


def test_summary_says_what_was_removed_or_how_to_look_at_what_was_kept(tmp_path: Path) -> None:
    removed = demo_summary.Cleanup(removed=accounts.RemovedInstance("demo-1", 41, 40, 0))
    line = demo_summary.cleanup_line(demo_summary.cleanup_summary(removed, "demo-1", None))
    assert "demo-1" in line and "41 media rows" in line and "40 stored objects" in line

    kept = demo_summary.cleanup_summary(demo_summary.Cleanup(kept=True), "demo-1", tmp_path)
    assert kept["kept"] is True
    line = demo_summary.cleanup_line(kept)
    assert f"INGEST_VAR_DIR={tmp_path} ingest media list --instance demo-1" in line

    failed = demo_summary.cleanup_summary(
        demo_summary.Cleanup(error="StorageError: down"), "demo-1", None
    )
    assert "FAILED" in demo_summary.cleanup_line(failed)


# --- verification runs while rows are still arriving ------------------------------------------


class _Verifier:
    def __init__(self) -> None:
        self.items: list[demo_verify.Sent] = []
        self.waited = False

    def submit(self, item: demo_verify.Sent) -> None:
        item.verified = True
        self.items.append(item)

    def done(self) -> int:
        return len(self.items)

    def wait(self, progress: Any = lambda _: None) -> None:
        self.waited = True
        progress(self.done())


def test_follow_hands_each_item_to_the_verifier_once_when_it_is_stored(
    demo_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    reg = registration.register(demo_settings, Provider.CLOUD)
    media = SandboxMedia("1", "5550001", "image", "image/jpeg", "ab" * 32, "q", 10, "http://x/")
    now = datetime.now(UTC)
    sent = [demo_verify.Sent(media, f"wamid.F{n}", now, 200) for n in range(3)]
    with sessions.begin() as session:
        instance = accounts.get_instance(session, reg.instance)
        make_media_item(
            session, instance, message_id="wamid.F0", state=MediaState.STORED, stored_at=utcnow()
        )
        make_media_item(session, instance, message_id="wamid.F1", state=MediaState.STORED)
        make_media_item(
            session,
            instance,
            message_id="wamid.F2",
            state=MediaState.FAILED,
            failure_reason="too_large",
        )
    verifier = _Verifier()

    demo.follow(demo_settings, reg, sent, 5.0, True, verifier)  # type: ignore[arg-type]

    assert sorted(item.wamid for item in verifier.items) == ["wamid.F0", "wamid.F1"]
    assert verifier.waited
    assert sent[2].state == MediaState.FAILED and sent[2].verified is None
