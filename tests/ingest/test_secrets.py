"""Keys for the secrets at rest (ingest.secrets), and their use where the worker claims."""

from __future__ import annotations

import logging
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest.error_budget import SqlErrorBudget
from ingest.models import Instance, MediaItem, MediaState
from ingest.pipeline import Pipeline
from ingest.secrets import (
    KEY_FILE_NAME,
    SecretBox,
    SecretKeyError,
    _load_or_create,
    generate_key,
    key_file_for,
    secret_box,
    secret_box_for,
)
from ingest.settings import ConfigError, Settings
from ingest.storage import MemoryStorage
from tests.factories import TEST_SECRET_KEY, make_instance, make_media_item


@pytest.fixture
def settings(make_settings: Any, database_url: str) -> Settings:
    """As the suite's, with the key a server database needs (the factories use it too)."""
    key = None if database_url.startswith("sqlite") else TEST_SECRET_KEY
    result: Settings = make_settings(database_url=database_url, secret_key=key)
    return result


def test_the_embedded_default_generates_a_private_key_in_var_dir_once(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    var = tmp_path / "embedded"
    settings: Settings = make_settings(var_dir=var, database_url="")  # the default database
    caplog.set_level(logging.WARNING, logger="ingest.secrets")

    box = secret_box(settings)
    token = box.encrypt("EAAG-provider-key")

    key_file = var / KEY_FILE_NAME
    assert key_file.is_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    generated = [r for r in caplog.records if "generated the key" in r.getMessage()]
    assert len(generated) == 1 and str(key_file) in generated[0].getMessage()
    assert "EAAG" not in token

    # Another process of the same deployment (no cache) reads the same key, and says nothing.
    caplog.clear()
    again = SecretBox([_load_or_create(key_file)], source=str(key_file))
    assert again.decrypt(token) == "EAAG-provider-key"
    assert not caplog.records
    assert [p.name for p in var.iterdir() if p.name.startswith(".secret-")] == []


def test_the_key_file_sits_beside_the_sqlite_file_whatever_var_dir_says(tmp_path: Path) -> None:
    # Web and worker may run with different var dirs; the database file is what they share.
    assert key_file_for(f"sqlite:///{tmp_path}/data/x.sqlite3", tmp_path / "var") == (
        tmp_path / "data" / KEY_FILE_NAME
    )
    assert key_file_for("sqlite://", tmp_path / "var") == tmp_path / "var" / KEY_FILE_NAME
    assert key_file_for("postgresql+psycopg://u@db/x", tmp_path / "var") is None


def test_racing_processes_agree_on_one_generated_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    start = threading.Barrier(8)
    keys: list[bytes] = []

    def first_use() -> None:
        start.wait()
        keys.append(_load_or_create(path))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert path.read_bytes().strip() == keys[0]


def test_configured_keys_encrypt_with_the_first_and_decrypt_with_every_one(
    make_settings: Any,
) -> None:
    old, new = generate_key(), generate_key()
    token = secret_box(make_settings(secret_key=old)).encrypt("app-secret")

    both = secret_box(make_settings(secret_key=f"{new}, {old}"))
    assert both.decrypt(token) == "app-secret"
    fresh = both.encrypt("app-secret")
    assert Fernet(new.encode()).decrypt(fresh.encode()) == b"app-secret"
    rotated = both.rotate(token)
    assert Fernet(new.encode()).decrypt(rotated.encode()) == b"app-secret"
    with pytest.raises(SecretKeyError, match="INGEST_SECRET_KEY"):
        secret_box(make_settings(secret_key=new)).decrypt(token)


def test_a_server_database_without_a_key_is_refused_in_one_line(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url="postgresql+psycopg://ingest@db.invalid/ingest", secret_key=None
    )
    with pytest.raises(ConfigError) as refused:
        secret_box(settings)
    message = str(refused.value)
    assert "INGEST_SECRET_KEY" in message and "\n" not in message
    assert not list(tmp_path.rglob(KEY_FILE_NAME))


@pytest.mark.parametrize(
    "bad",
    ["not-a-key", "c2hvcnQ=", f"{generate_key()},nope"],
    ids=["not-a-key", "too-short", "two-keys-one-bad"],
)
def test_a_malformed_key_names_the_variable_never_the_key(make_settings: Any, bad: str) -> None:
    with pytest.raises(ConfigError) as refused:
        secret_box(make_settings(secret_key=bad))
    assert "INGEST_SECRET_KEY" in str(refused.value)
    assert "nope" not in str(refused.value) and "not-a-key" not in str(refused.value)


def test_boxes_are_cached_per_process(make_settings: Any) -> None:
    settings = make_settings(secret_key=generate_key())
    assert secret_box(settings) is secret_box(settings)
    assert secret_box_for(settings.database_url, settings.secret_key, settings.var_dir) is (
        secret_box(settings)
    )
    assert "SecretBox" in repr(secret_box(settings))
    assert settings.secret_key.get_secret_value() not in repr(secret_box(settings))


# --- where the worker uses the API key ----------------------------------------------------


def _pipeline(settings: Settings, sessions: sessionmaker[Session]) -> Pipeline:
    return Pipeline(
        settings=settings,
        sessions=sessions,
        storage=MemoryStorage(),
        budget=SqlErrorBudget.from_settings(sessions, settings),
        clients=lambda credentials: None,  # type: ignore[arg-type,return-value]
    )


def test_the_claim_decrypts_the_api_key_for_the_provider_client(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        item_id = make_media_item(session, make_instance(session, api_key="EAAG-key")).id
        stored = session.scalar(select(Instance.api_key_encrypted))
    assert stored is not None and "EAAG-key" not in stored

    work = _pipeline(settings, sessions).claim(item_id)
    assert work is not None
    assert work.credentials.api_key == "EAAG-key"
    assert "EAAG-key" not in repr(work)


def test_a_key_encrypted_with_an_unknown_key_hands_the_row_back_untouched(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        item_id = make_media_item(session, make_instance(session)).id
        session.execute(
            update(Instance).values(
                api_key_encrypted=SecretBox([generate_key()]).encrypt("elsewhere")
            )
        )

    with pytest.raises(SecretKeyError, match="INGEST_SECRET_KEY"):
        _pipeline(settings, sessions).claim(item_id)
    with sessions() as session:
        row = session.get(MediaItem, item_id)
        assert row is not None
        assert (row.state, row.attempts, row.lease_owner) == (MediaState.PENDING, 0, None)
