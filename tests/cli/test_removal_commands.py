"""`ingest instance update --retention-days`, `ingest media purge` and `ingest media erase`,
against the test database (SQLite and PostgreSQL) and local files."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from ingest.db import make_engine, make_session_factory
from ingest.media_rules import object_key
from ingest.models import Instance, MediaItem, MediaState, utcnow
from ingest.storage import LocalStorage
from tests.factories import make_instance, make_media_item

DATA = b"%PDF-1.4 a contract " * 50


def _stored(database_url: str, media: Path, *, days_old: float) -> tuple[str, str, str]:
    """A stored row with its object under ``media``: (instance, message id, key)."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            instance = session.scalar(select(Instance).where(Instance.name == "shop"))
            if instance is None:
                instance = make_instance(session, name="shop")
            received = utcnow() - timedelta(days=days_old)
            item = make_media_item(
                session,
                instance,
                media_type="document",
                received_at=received,
                expires_at=received + timedelta(days=7),
                state=MediaState.STORED,
                size=len(DATA),
                caption="my passport",
            )
            key = object_key(instance.name, "document", item.media_id or item.message_id)
            item.storage_key = key
            LocalStorage(media).put(
                key,
                io.BytesIO(DATA),
                size=len(DATA),
                sha256=hashlib.sha256(DATA).hexdigest(),
                content_type="application/pdf",
            )
            return instance.name, item.message_id, key
    finally:
        engine.dispose()


def _state(database_url: str, message_id: str) -> MediaItem:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            row = session.scalar(select(MediaItem).where(MediaItem.message_id == message_id))
            assert row is not None
            return row
    finally:
        engine.dispose()


def test_retention_set_then_purged_by_the_command(
    runner: CliRunner, database_url: str, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    name, old, old_key = _stored(database_url, media, days_old=40)
    _, recent, recent_key = _stored(database_url, media, days_old=1)

    updated = runner.invoke(cli, ["instance", "update", name, "--retention-days", "30"])
    assert updated.exit_code == 0, updated.output
    assert "retention 30 days" in updated.output
    listed = runner.invoke(cli, ["instance", "list"])
    assert "retention=30 days" in listed.output

    dry = runner.invoke(cli, ["media", "purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would purge 1 item(s)" in dry.output
    assert _state(database_url, old).state == MediaState.STORED

    purged = runner.invoke(cli, ["media", "purge"])
    assert purged.exit_code == 0, purged.output
    assert "purged 1 item(s)" in purged.output
    assert not LocalStorage(media).path_for(old_key).exists()
    assert LocalStorage(media).path_for(recent_key).exists()
    row = _state(database_url, old)
    assert row.state == MediaState.PURGED and row.removed_by == "retention: 30 days"
    assert _state(database_url, recent).state == MediaState.STORED

    # Back to keeping everything.
    forever = runner.invoke(cli, ["instance", "update", name, "--no-retention"])
    assert forever.exit_code == 0 and "retention for ever" in forever.output


def test_contradicting_retention_flags_are_refused(runner: CliRunner) -> None:
    both = runner.invoke(
        cli, ["instance", "update", "shop", "--retention-days", "3", "--no-retention"]
    )
    assert both.exit_code == 2
    assert "contradict" in both.output
    zero = runner.invoke(cli, ["instance", "update", "shop", "--retention-days", "0"])
    assert zero.exit_code == 2


def test_media_erase_deletes_and_records_who(
    runner: CliRunner, database_url: str, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    name, message_id, key = _stored(database_url, media, days_old=0)

    erased = runner.invoke(
        cli,
        ["media", "erase", "--instance", name, "--message-id", message_id, "--by", "ticket 81"],
    )
    assert erased.exit_code == 0, erased.output
    assert "by ticket 81" in erased.output
    assert not LocalStorage(media).path_for(key).exists()
    row = _state(database_url, message_id)
    assert row.state == MediaState.ERASED and row.removed_by == "ticket 81"
    assert row.caption is None

    again = runner.invoke(cli, ["media", "erase", "--instance", name, "--message-id", message_id])
    assert again.exit_code == 0
    assert "erased before" in again.output and "by ticket 81" in again.output

    listed = runner.invoke(cli, ["media", "list", "--state", "erased"])
    assert message_id in listed.output


def test_media_erase_of_an_unknown_message_is_a_clear_error(
    runner: CliRunner, database_url: str, tmp_path: Path
) -> None:
    name, _, _ = _stored(database_url, tmp_path / "media", days_old=0)
    missing = runner.invoke(
        cli, ["media", "erase", "--instance", name, "--message-id", "wamid.nobody"]
    )
    assert missing.exit_code == 1
    assert "has no message 'wamid.nobody'" in missing.output
    assert "Traceback" not in missing.output
