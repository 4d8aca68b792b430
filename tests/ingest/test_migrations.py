from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text

from ingest import accounts, migrate
from ingest.db import make_engine, make_session_factory
from ingest.intake import verify_token_matches
from ingest.secrets import SecretBox, SecretKeyError, generate_key, key_file_for
from tests.factories import TEST_SECRET_KEY


def test_models_and_migrations_agree(database_url: str) -> None:
    # `alembic check`: raises if autogenerate would produce any operation.
    migrate.check(database_url)


def test_upgrade_is_idempotent_and_creates_every_table(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"accounts", "instances", "api_tokens", "media_items", "error_budget_events"} <= tables


def test_0002_counts_no_lease_loss_for_rows_that_existed_before(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command
    from sqlalchemy import select

    from ingest.db import make_session_factory
    from ingest.models import MediaItem
    from tests.factories import make_instance, make_media_item

    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as session:
            item_id = make_media_item(session, make_instance(session), attempts=7).id
        if not database_url.startswith("sqlite"):
            # Going back through 0005 decrypts the factory's secrets: its key, from the
            # environment as `ingest db upgrade` would have it.
            monkeypatch.setenv("INGEST_SECRET_KEY", TEST_SECRET_KEY)
        command.downgrade(migrate.alembic_config(database_url), "0001")
        assert "lease_losses" not in {c["name"] for c in inspect(engine).get_columns("media_items")}
        migrate.upgrade(database_url)
        with sessions() as session:
            row = session.execute(
                select(MediaItem.attempts, MediaItem.lease_losses).where(MediaItem.id == item_id)
            ).one()
        assert tuple(row) == (7, 0)
    finally:
        engine.dispose()


def _insert_plain_instances(engine: Engine) -> None:
    """Rows as revision 0004 stored them: every secret in clear."""
    with engine.begin() as conn:
        account_id = conn.execute(text("SELECT id FROM accounts WHERE name = 'default'")).scalar()
        for name, phone, api_key, app_secret, verify_token in (
            ("cloud", "1", "EAAG-cloud-key", "meta-app-secret", "verify-me"),
            ("open", "2", "d360-key", None, None),
        ):
            conn.execute(
                text(
                    "INSERT INTO instances (account_id, name, provider, phone_number_id, "
                    "api_key, app_secret, verify_token, connected, created_at) VALUES "
                    "(:account, :name, 'cloud', :phone, :api_key, :app_secret, :verify_token, "
                    "true, CURRENT_TIMESTAMP)"
                ),
                {
                    "account": account_id,
                    "name": name,
                    "phone": phone,
                    "api_key": api_key,
                    "app_secret": app_secret,
                    "verify_token": verify_token,
                },
            )


def test_0005_encrypts_api_keys_and_app_secrets_and_hashes_verify_tokens(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command

    key = generate_key()
    monkeypatch.setenv("INGEST_SECRET_KEY", key)  # what `ingest db upgrade` runs with
    command.downgrade(migrate.alembic_config(database_url), "0004")
    engine = make_engine(database_url)
    try:
        _insert_plain_instances(engine)
        migrate.upgrade(database_url)
        columns = {c["name"] for c in inspect(engine).get_columns("instances")}
        assert {"api_key", "app_secret", "verify_token"}.isdisjoint(columns)
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT * FROM instances ORDER BY name")).all()
        for secret in ("EAAG-cloud-key", "meta-app-secret", "verify-me", "d360-key"):
            assert secret not in str(raw)
        with make_session_factory(engine)() as session:
            cloud = accounts.get_instance(session, "cloud")
            unchecked = accounts.get_instance(session, "open")
            box = SecretBox([key])
            assert box.decrypt(cloud.api_key_encrypted) == "EAAG-cloud-key"
            assert cloud.app_secret_encrypted is not None
            assert box.decrypt(cloud.app_secret_encrypted) == "meta-app-secret"
            assert verify_token_matches("verify-me", [cloud])
            assert box.decrypt(unchecked.api_key_encrypted) == "d360-key"
            # An instance that took unsigned posts before gets no consent it never gave:
            # its webhooks are refused until the operator decides.
            assert (cloud.allow_unsigned, unchecked.allow_unsigned) == (False, False)
            assert accounts.unsigned_instances(session) == []

        # Downgrade gives the encrypted secrets back in clear; a hash gives nothing back.
        command.downgrade(migrate.alembic_config(database_url), "0004")
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT name, api_key, app_secret, verify_token FROM instances ORDER BY name")
            ).all()
        assert [tuple(row) for row in rows] == [
            ("cloud", "EAAG-cloud-key", "meta-app-secret", None),
            ("open", "d360-key", None, None),
        ]
        migrate.upgrade(database_url)
    finally:
        engine.dispose()


def test_0005_uses_the_key_generated_beside_an_sqlite_file(sqlite_url: str) -> None:
    from alembic import command

    command.downgrade(migrate.alembic_config(sqlite_url), "0004")
    engine = make_engine(sqlite_url)
    try:
        _insert_plain_instances(engine)
        migrate.upgrade(sqlite_url)
        key_file = key_file_for(sqlite_url, Path("unused"))
        assert key_file is not None and key_file.is_file()
        with make_session_factory(engine)() as session:
            cloud = accounts.get_instance(session, "cloud")
            box = SecretBox([key_file.read_bytes().strip()])
            assert box.decrypt(cloud.api_key_encrypted) == "EAAG-cloud-key"
    finally:
        engine.dispose()


def test_0005_on_a_server_database_without_a_key_stops_before_changing_anything(
    database_url: str,
) -> None:
    from alembic import command

    if database_url.startswith("sqlite"):
        pytest.skip("SQLite generates its key")
    command.downgrade(migrate.alembic_config(database_url), "0004")
    engine = make_engine(database_url)
    try:
        _insert_plain_instances(engine)
        config = migrate.alembic_config(database_url)
        with engine.connect() as connection:
            # Our own connection (env.py takes it): the refusal must not leak one.
            config.attributes["connection"] = connection
            with pytest.raises(SecretKeyError, match="INGEST_SECRET_KEY"):
                command.upgrade(config, "head")
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            api_key = conn.execute(text("SELECT api_key FROM instances WHERE name = 'cloud'"))
            assert (version, api_key.scalar()) == ("0004", "EAAG-cloud-key")
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM instances"))
        migrate.upgrade(database_url)  # nothing to encrypt: no key needed
    finally:
        engine.dispose()


def test_0006_keeps_rows_admits_the_new_states_only_and_guards_its_downgrade(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command
    from sqlalchemy import update
    from sqlalchemy.exc import IntegrityError

    from ingest.models import MediaItem, MediaState
    from tests.factories import make_instance, make_media_item

    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    if not database_url.startswith("sqlite"):
        monkeypatch.setenv("INGEST_SECRET_KEY", TEST_SECRET_KEY)
    try:
        with sessions.begin() as session:
            item_id = make_media_item(
                session, make_instance(session), state=MediaState.STORED, size=5
            ).id
        command.downgrade(migrate.alembic_config(database_url), "0005")
        migrate.upgrade(database_url)
        with sessions.begin() as session:
            row = session.get(MediaItem, item_id)
            assert row is not None and (row.state, row.size) == ("stored", 5)
            row.state = MediaState.ERASED
        with pytest.raises(IntegrityError), sessions.begin() as session:
            session.execute(
                update(MediaItem).where(MediaItem.id == item_id).values(state="vanished")
            )
        with pytest.raises(RuntimeError, match="purged or erased"):
            command.downgrade(migrate.alembic_config(database_url), "0005")
        assert "removed_at" in {c["name"] for c in inspect(engine).get_columns("media_items")}
    finally:
        engine.dispose()


def _insert_triggers(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(
            connection.scalars(
                text(
                    "SELECT tgname FROM pg_trigger "
                    "WHERE tgrelid = 'media_items'::regclass AND NOT tgisinternal"
                )
            )
        )


def test_0008_leaves_inserts_without_a_notification_and_its_downgrade_restores_it(
    database_url: str,
) -> None:
    """The relay polls (ingest.wake_relay): no insert pays for a NOTIFY, whose commits
    PostgreSQL serialises. The older code listens for it, so a downgrade puts it back."""
    if database_url.startswith("sqlite"):
        pytest.skip("the notification trigger was PostgreSQL's only")
    from alembic import command

    engine = make_engine(database_url)
    try:
        assert _insert_triggers(engine) == set()
        command.downgrade(migrate.alembic_config(database_url), "0007")
        assert _insert_triggers(engine) == {"media_items_new_notify"}
        migrate.upgrade(database_url)
        assert _insert_triggers(engine) == set()
    finally:
        engine.dispose()
