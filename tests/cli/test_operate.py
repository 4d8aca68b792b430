import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from cli.main import cli
from ingest.db import make_engine, make_session_factory
from ingest.models import Instance, MediaItem, MediaState, utcnow
from tests.factories import make_instance, make_media_item


@pytest.fixture
def db(runner: CliRunner, database_url: str) -> Iterator[sessionmaker[Session]]:
    # After `runner`: on SQLite the secret key lives beside the database, under INGEST_VAR_DIR.
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def _instance(db: sessionmaker[Session], name: str) -> int:
    with db.begin() as session:
        return make_instance(session, name=name).id


def _item(db: sessionmaker[Session], instance_id: int, **values: Any) -> int:
    with db.begin() as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        return make_media_item(session, instance, **values).id


def _state(db: sessionmaker[Session], item_id: int) -> str:
    with db() as session:
        item = session.get(MediaItem, item_id)
        assert item is not None
        return item.state


def test_stats_prints_an_aligned_table(runner: CliRunner, db: sessionmaker[Session]) -> None:
    shop = _instance(db, "shop")
    _item(db, shop, received_at=utcnow() - timedelta(hours=2))
    _item(db, shop, state=MediaState.FAILED, failure_reason="too_large")
    _item(db, shop, expires_at=utcnow() + timedelta(minutes=30))

    result = runner.invoke(cli, ["stats"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["instance", "state", "reason", "count"]
    assert lines[1].split() == ["shop", "failed", "too_large", "1"]
    assert lines[2].split() == ["shop", "pending", "-", "2"]
    assert lines[0].index("count") == lines[1].index("1")  # aligned columns
    assert "oldest pending: 2h00m" in result.output
    assert "at risk: 1 within 24h, 1 within 1h" in result.output


def test_stats_json(runner: CliRunner, db: sessionmaker[Session]) -> None:
    shop = _instance(db, "shop")
    _item(db, shop, state=MediaState.STORED)

    result = runner.invoke(cli, ["stats", "--json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["counts"] == [
        {"instance": "shop", "state": "stored", "reason": None, "count": 1}
    ]
    assert document["oldest_pending_seconds"] is None
    assert document["at_risk"] == {"24h": 0, "1h": 0}


def test_redrive_dry_run_changes_nothing(runner: CliRunner, db: sessionmaker[Session]) -> None:
    shop = _instance(db, "shop")
    failed = _item(db, shop, state=MediaState.FAILED, failure_reason="provider_error")

    result = runner.invoke(cli, ["redrive", "--dry-run"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["instance", "state", "reason", "action", "count"]
    assert lines[1].split() == ["shop", "failed", "provider_error", "would", "redrive", "1"]
    assert f"{failed}" in result.output and "nothing changed" in result.output
    assert _state(db, failed) == MediaState.FAILED


def test_redrive_changes_the_selected_rows(runner: CliRunner, db: sessionmaker[Session]) -> None:
    shop, other = _instance(db, "shop"), _instance(db, "other")
    failed = _item(db, shop, state=MediaState.FAILED, failure_reason="too_large")
    elsewhere = _item(db, other, state=MediaState.FAILED, failure_reason="too_large")

    result = runner.invoke(
        cli, ["redrive", "--instance", "shop", "--state", "failed", "--reason", "too_large"]
    )

    assert result.exit_code == 0, result.output
    assert "redriven 1, refused 0" in result.output
    assert _state(db, failed) == MediaState.PENDING
    assert _state(db, elsewhere) == MediaState.FAILED


def test_redrive_refuses_expired_media_ids(runner: CliRunner, db: sessionmaker[Session]) -> None:
    shop = _instance(db, "shop")
    gone = utcnow() - timedelta(hours=1)
    expired = _item(db, shop, state=MediaState.EXPIRED, expires_at=gone)
    mismatch = _item(
        db, shop, state=MediaState.FAILED, failure_reason="checksum_mismatch", expires_at=gone
    )

    result = runner.invoke(cli, ["redrive"])

    assert result.exit_code == 0, result.output
    assert "refused (past 7 days)" in result.output
    assert "redriven 0, refused 2" in result.output
    assert _state(db, expired) == MediaState.EXPIRED
    assert _state(db, mismatch) == MediaState.FAILED


def test_redrive_help_names_the_exempt_reasons(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["redrive", "--help"])
    assert result.exit_code == 0
    assert "Failure reasons exempt from this: none" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--state", "stored"], "--state must be one of failed, expired"),
        (["--reason", "bogus"], "unknown --reason 'bogus'"),
        (["--state", "expired", "--reason", "too_large"], "expired rows have no failure reason"),
        (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601"),
        (["--since", "2026-01-02", "--until", "2026-01-01"], "--since must be before --until"),
        (["--instance", "nope"], "no instance named 'nope'"),
    ],
)
def test_redrive_validation_errors_are_one_line(
    runner: CliRunner, db: sessionmaker[Session], arguments: list[str], message: str
) -> None:
    result = runner.invoke(cli, ["redrive", *arguments])

    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert message in result.output
