import hashlib
import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli import registry
from cli.main import cli
from ingest.accounts import hash_secret
from ingest.db import make_engine, make_session_factory
from ingest.models import ApiToken, Instance, MediaItem
from ingest.secrets import SecretBox, generate_key, secret_box_for
from ingest.storage import LocalStorage
from tests.factories import TEST_SECRET_KEY, make_media_item


def _box(database_url: str) -> SecretBox:
    key = None if database_url.startswith("sqlite") else TEST_SECRET_KEY
    return secret_box_for(database_url, key, Path("unused"))


def test_instance_add_then_token_create_prints_the_token_last(
    runner: CliRunner, database_url: str
) -> None:
    added = runner.invoke(
        cli,
        [
            "instance",
            "add",
            "shop",
            "--provider",
            "cloud",
            "--phone-number-id",
            "123",
            "--api-key",
            "secret-key",
            "--app-secret",
            "app-secret",
        ],
    )
    assert added.exit_code == 0, added.output
    assert "secret-key" not in added.output

    created = runner.invoke(cli, ["token", "create", "--instance", "shop"])
    assert created.exit_code == 0, created.output
    token = created.output.strip().splitlines()[-1]
    assert len(token) >= 32

    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(ApiToken.token_hash)) == hash_secret(token)
    engine.dispose()

    listed = runner.invoke(cli, ["instance", "list"])
    assert "shop\tcloud\t123\tconnected\tsigned" in listed.output
    assert "secret-key" not in listed.output and "app-secret" not in listed.output


def _stored_instance(database_url: str, name: str) -> Instance | None:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return session.scalar(select(Instance).where(Instance.name == name))
    finally:
        engine.dispose()


ADD_SHOP = ["instance", "add", "shop", "--provider", "cloud", "--phone-number-id", "123"]


def test_secrets_can_come_from_the_environment_instead_of_the_command_line(
    runner: CliRunner, database_url: str
) -> None:
    env = {
        "INGEST_INSTANCE_API_KEY": "env-api-key",
        "INGEST_INSTANCE_APP_SECRET": "env-app-secret",
        "INGEST_INSTANCE_VERIFY_TOKEN": "env-verify-token",
    }
    added = runner.invoke(cli, ADD_SHOP, env=env)
    assert added.exit_code == 0, added.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.app_secret_encrypted is not None
    box = _box(database_url)
    assert box.decrypt(stored.api_key_encrypted) == "env-api-key"
    assert box.decrypt(stored.app_secret_encrypted) == "env-app-secret"
    assert stored.verify_token_hash == hash_secret("env-verify-token")
    assert not any(secret in added.output for secret in env.values())


def test_a_flag_still_wins_over_the_environment(runner: CliRunner, database_url: str) -> None:
    added = runner.invoke(
        cli,
        [*ADD_SHOP, "--api-key", "flag-key"],
        env={"INGEST_INSTANCE_API_KEY": "env-key", "INGEST_INSTANCE_APP_SECRET": "a"},
    )
    assert added.exit_code == 0, added.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None
    assert _box(database_url).decrypt(stored.api_key_encrypted) == "flag-key"


def test_a_missing_api_key_is_prompted_for_without_echo_on_a_terminal(
    runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_interactive", lambda: True)
    added = runner.invoke(
        cli, ADD_SHOP, input="typed-key\n", env={"INGEST_INSTANCE_APP_SECRET": "a"}
    )
    assert added.exit_code == 0, added.output
    assert "typed-key" not in added.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None
    assert _box(database_url).decrypt(stored.api_key_encrypted) == "typed-key"


def test_a_missing_api_key_is_a_usage_error_without_a_terminal(
    runner: CliRunner, database_url: str
) -> None:
    added = runner.invoke(cli, ADD_SHOP, input="not-a-key\n")
    assert added.exit_code == 2
    assert "Missing option '--api-key'" in added.output
    assert "INGEST_INSTANCE_API_KEY" in added.output
    assert _stored_instance(database_url, "shop") is None


@pytest.mark.parametrize("name", [".shop", "a/b", "my shop", "lojá", "x" * 101])
def test_an_unusable_instance_name_is_refused_with_the_rule(
    runner: CliRunner, database_url: str, name: str
) -> None:
    argv = ["instance", "add", name, "--provider", "cloud", "--phone-number-id", "1"]
    added = runner.invoke(cli, [*argv, "--api-key", "k"])
    assert added.exit_code == 2
    assert "invalid instance name" in added.output
    assert "letters, digits" in added.output
    assert _stored_instance(database_url, name) is None


def test_disconnect_unknown_instance_is_a_clear_error(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["instance", "disconnect", "ghost"])
    assert result.exit_code == 1
    assert "no instance named 'ghost'" in result.output


def test_token_needs_exactly_one_scope(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["token", "create"])
    assert result.exit_code == 2
    assert "exactly one of --instance or --account" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["instance", "--help"],
        ["instance", "add", "--help"],
        ["token", "create", "--help"],
        ["web", "--help"],
        ["worker", "--help"],
        ["beat", "--help"],
        ["db", "--help"],
        ["account", "add", "--help"],
        ["media", "list", "--help"],
        ["token", "list", "--help"],
        ["token", "revoke", "--help"],
        ["instance", "update", "--help"],
        ["instance", "remove", "--help"],
        ["secrets", "--help"],
        ["secrets", "rotate", "--help"],
        ["secrets", "generate-key", "--help"],
    ],
)
def test_every_command_has_help(argv: list[str]) -> None:
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_a_bad_setting_stops_the_command_with_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_STORAGE_URL"] = "ftp://nowhere/x"
    ingest = Path(sys.executable).parent / "ingest"
    result = subprocess.run(
        [str(ingest), "instance", "list"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "INGEST_STORAGE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def _add_shop(runner: CliRunner) -> None:
    added = runner.invoke(cli, [*ADD_SHOP, "--api-key", "k", "--app-secret", "a"])
    assert added.exit_code == 0, added.output


def test_token_create_stores_its_own_rate_limit(runner: CliRunner, database_url: str) -> None:
    _add_shop(runner)
    created = runner.invoke(
        cli, ["token", "create", "--instance", "shop", "--rate-limit", "1000/minute"]
    )
    assert created.exit_code == 0, created.output
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(ApiToken.rate_limit)) == "1000/minute"
    engine.dispose()


@pytest.mark.parametrize("bad", ["fast", "0/minute", "1/second;10/minute"])
def test_token_create_refuses_a_bad_rate_limit_in_one_line(
    runner: CliRunner, database_url: str, bad: str
) -> None:
    _add_shop(runner)
    created = runner.invoke(cli, ["token", "create", "--instance", "shop", "--rate-limit", bad])
    assert created.exit_code == 2
    errors = [line for line in created.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "rate limit" in errors[0], created.output
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(ApiToken.id)) is None
    engine.dispose()


def test_token_list_shows_everything_but_the_token(runner: CliRunner, database_url: str) -> None:
    _add_shop(runner)
    one = runner.invoke(cli, ["token", "create", "--instance", "shop", "--label", "crm"])
    two = runner.invoke(
        cli, ["token", "create", "--account", "default", "--rate-limit", "5/second"]
    )
    tokens = [result.output.strip().splitlines()[-1] for result in (one, two)]

    listed = runner.invoke(cli, ["token", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split("\t") == ["id", "label", "scope", "created", "rate limit"]
    first, second = (line.split("\t") for line in lines[1:])
    assert (first[0], first[1], first[2], first[4]) == ("1", "crm", "instance shop", "default")
    assert (second[0], second[1], second[2], second[4]) == ("2", "-", "account default", "5/second")
    assert first[3].startswith("20")
    for token in tokens:
        assert token not in listed.output
        assert hash_secret(token) not in listed.output

    only_shop = runner.invoke(cli, ["token", "list", "--instance", "shop"])
    assert len(only_shop.output.splitlines()) == 3  # the instance's and its account's
    both = runner.invoke(cli, ["token", "list", "--instance", "shop", "--account", "default"])
    assert both.exit_code == 2
    assert "at most one of --instance or --account" in both.output


def test_token_list_when_empty(runner: CliRunner) -> None:
    listed = runner.invoke(cli, ["token", "list"])
    assert (listed.exit_code, listed.output) == (0, "no tokens\n")


def test_token_revoke_deletes_it_and_an_unknown_id_is_one_line(
    runner: CliRunner, database_url: str
) -> None:
    _add_shop(runner)
    runner.invoke(cli, ["token", "create", "--instance", "shop"])
    revoked = runner.invoke(cli, ["token", "revoke", "1"])
    assert revoked.exit_code == 0, revoked.output
    assert "token 1 revoked" in revoked.output
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(ApiToken.id)) is None
    engine.dispose()
    again = runner.invoke(cli, ["token", "revoke", "1"])
    assert again.exit_code == 1
    assert again.output == "Error: no token with id 1\n"


def test_instance_list_says_why_an_instance_is_disconnected(runner: CliRunner) -> None:
    _add_shop(runner)
    assert runner.invoke(cli, ["instance", "disconnect", "shop"]).exit_code == 0
    listed = runner.invoke(cli, ["instance", "list"]).output
    assert "\tdisconnected\t" in listed
    assert "reason=operator" in listed
    assert "since=20" in listed
    assert runner.invoke(cli, ["instance", "connect", "shop"]).exit_code == 0
    listed = runner.invoke(cli, ["instance", "list"]).output
    assert "\tconnected\t" in listed
    assert "reason=" not in listed and "since=" not in listed


def test_media_list_refuses_an_unknown_state_naming_the_valid_ones(runner: CliRunner) -> None:
    listed = runner.invoke(cli, ["media", "list", "--state", "done"])
    assert listed.exit_code == 2
    for state in ("pending", "downloading", "stored", "failed", "expired"):
        assert state in listed.output


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_media_list_limit_must_be_positive(runner: CliRunner, limit: str) -> None:
    listed = runner.invoke(cli, ["media", "list", "--limit", limit])
    assert listed.exit_code == 2
    assert "--limit" in listed.output


def test_media_list_has_a_header_and_says_when_there_is_nothing(
    runner: CliRunner, database_url: str
) -> None:
    empty = runner.invoke(cli, ["media", "list"])
    assert (empty.exit_code, empty.output) == (0, "no media\n")
    _add_shop(runner)
    engine = make_engine(database_url)
    with make_session_factory(engine).begin() as session:
        shop = session.scalar(select(Instance).where(Instance.name == "shop"))
        assert shop is not None
        make_media_item(session, shop, message_id="wamid.ONE", state="stored", size=10)
    engine.dispose()
    listed = runner.invoke(cli, ["media", "list", "--state", "stored"])
    lines = listed.output.splitlines()
    assert lines[0].split("\t") == [
        "id",
        "instance",
        "message id",
        "type",
        "state",
        "reason",
        "size",
    ]
    assert lines[1].split("\t")[1:] == ["shop", "wamid.ONE", "image", "stored", "-", "10"]
    assert runner.invoke(cli, ["media", "list", "--state", "failed"]).output == "no media\n"


@pytest.mark.parametrize("name", [".acme", "a/b", "my account", "acmé"])
def test_account_add_refuses_names_the_instance_rule_refuses(runner: CliRunner, name: str) -> None:
    added = runner.invoke(cli, ["account", "add", name])
    assert added.exit_code == 2
    assert "invalid account name" in added.output
    assert "letters, digits" in added.output


# --- webhook authentication, update, remove, rotation (issue 14) ---------------------------


def test_instance_add_without_any_webhook_check_is_refused_naming_the_choices(
    runner: CliRunner, database_url: str
) -> None:
    added = runner.invoke(cli, [*ADD_SHOP, "--api-key", "k"])
    assert added.exit_code == 2
    for choice in ("--app-secret", "--webhook-secret", "--allow-unsigned-webhooks"):
        assert choice in added.output
    assert _stored_instance(database_url, "shop") is None


def test_unsigned_webhooks_are_allowed_only_by_name_and_listed_loudly(
    runner: CliRunner, database_url: str
) -> None:
    added = runner.invoke(cli, [*ADD_SHOP, "--api-key", "k", "--allow-unsigned-webhooks"])
    assert added.exit_code == 0, added.output
    assert "accepts unsigned webhooks" in added.stderr
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.allow_unsigned is True

    listed = runner.invoke(cli, ["instance", "list"])
    assert "shop\tcloud\t123\tconnected\tUNSIGNED WEBHOOKS ACCEPTED\t" in listed.stdout
    assert "accept unsigned webhooks" in listed.stderr and "shop" in listed.stderr


def test_instance_add_help_says_what_unsigned_webhooks_cost() -> None:
    shown = CliRunner().invoke(cli, ["instance", "add", "--help"]).output
    flat = " ".join(shown.split())
    assert "--allow-unsigned-webhooks" in flat
    assert "Anyone who can reach the service can then make it download with this instance's" in (
        flat
    )
    assert "fill its queue" in flat


def test_a_360dialog_instance_with_a_shared_secret_header_is_listed_so(
    runner: CliRunner,
) -> None:
    argv = ["instance", "add", "d360", "--provider", "360dialog", "--phone-number-id", "9"]
    added = runner.invoke(
        cli,
        [*argv, "--api-key", "k", "--webhook-secret-header", "X-D360"],
        env={"INGEST_INSTANCE_WEBHOOK_SECRET": "shared"},
    )
    assert added.exit_code == 0, added.output
    listed = runner.invoke(cli, ["instance", "list"]).stdout
    assert "d360\t360dialog\t9\tconnected\tsecret-header=X-D360\t" in listed


def test_instance_update_changes_only_what_is_given(
    runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"INGEST_INSTANCE_APP_SECRET": "old-app", "INGEST_INSTANCE_VERIFY_TOKEN": "old-verify"}
    assert runner.invoke(cli, [*ADD_SHOP, "--api-key", "old-key"], env=env).exit_code == 0
    box = _box(database_url)

    updated = runner.invoke(
        cli, ["instance", "update", "shop"], env={"INGEST_INSTANCE_API_KEY": "new-key"}
    )
    assert updated.exit_code == 0, updated.output
    assert "instance shop updated: api key (webhooks: signed)" in updated.output
    assert "new-key" not in updated.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.app_secret_encrypted is not None
    assert box.decrypt(stored.api_key_encrypted) == "new-key"
    assert box.decrypt(stored.app_secret_encrypted) == "old-app"
    assert stored.verify_token_hash == hash_secret("old-verify")

    # A flag given alone is a hidden prompt, on a terminal.
    monkeypatch.setattr(registry, "_interactive", lambda: True)
    prompted = runner.invoke(
        cli, ["instance", "update", "shop", "--app-secret", "--verify-token"], input="a2\nv2\n"
    )
    assert prompted.exit_code == 0, prompted.output
    assert "a2" not in prompted.output and "v2" not in prompted.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.app_secret_encrypted is not None
    assert box.decrypt(stored.app_secret_encrypted) == "a2"
    assert stored.verify_token_hash == hash_secret("v2")
    assert box.decrypt(stored.api_key_encrypted) == "new-key"


def test_instance_update_without_a_terminal_does_not_wait_for_a_secret(
    runner: CliRunner,
) -> None:
    _add_shop(runner)
    result = runner.invoke(cli, ["instance", "update", "shop", "--api-key"], input="k\n")
    assert result.exit_code == 2
    assert "--api-key" in result.output


def test_instance_update_refuses_nothing_unknown_names_and_unchecked_webhooks(
    runner: CliRunner,
) -> None:
    assert runner.invoke(cli, ["instance", "update", "shop"]).exit_code == 2
    ghost = runner.invoke(cli, ["instance", "update", "ghost", "--verify-token", "v"])
    assert ghost.exit_code == 1 and "no instance named 'ghost'" in ghost.output

    argv = [*ADD_SHOP, "--api-key", "k", "--allow-unsigned-webhooks"]
    assert runner.invoke(cli, argv).exit_code == 0
    refused = runner.invoke(cli, ["instance", "update", "shop", "--require-signed-webhooks"])
    assert refused.exit_code == 1
    assert "would take webhooks from anyone" in refused.output

    signed = runner.invoke(cli, ["instance", "update", "shop", "--app-secret", "a"])
    assert signed.exit_code == 0, signed.output
    listed = runner.invoke(cli, ["instance", "list"])
    assert "\tsigned\t" in listed.stdout and "UNSIGNED" not in listed.output


def test_instance_remove_is_refused_while_it_has_media_unless_purged(
    runner: CliRunner, database_url: str, tmp_path: Path
) -> None:
    _add_shop(runner)
    runner.invoke(cli, ["token", "create", "--instance", "shop"])
    storage = LocalStorage(tmp_path / "media")
    body = b"jpeg"
    storage.put(
        "shop/image/one.jpg",
        io.BytesIO(body),
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        content_type="image/jpeg",
    )
    engine = make_engine(database_url)
    with make_session_factory(engine).begin() as session:
        shop = session.scalar(select(Instance).where(Instance.name == "shop"))
        assert shop is not None
        make_media_item(session, shop, state="stored", storage_key="shop/image/one.jpg")
    engine.dispose()

    refused = runner.invoke(cli, ["instance", "remove", "shop"])
    assert refused.exit_code == 1
    assert "1 media row(s)" in refused.output
    assert _stored_instance(database_url, "shop") is not None

    removed = runner.invoke(cli, ["instance", "remove", "shop", "--purge"])
    assert removed.exit_code == 0, removed.output
    assert "1 media row(s), 1 stored object(s), 1 token(s)" in removed.output
    assert _stored_instance(database_url, "shop") is None
    assert not (tmp_path / "media" / "shop" / "image" / "one.jpg").exists()
    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalars(select(MediaItem)).all() == []
        assert session.scalars(select(ApiToken)).all() == []
    engine.dispose()

    _add_shop(runner)  # an instance without media goes without --purge
    assert runner.invoke(cli, ["instance", "remove", "shop"]).exit_code == 0


def test_secrets_rotate_re_encrypts_with_the_first_key_so_the_old_can_go(
    runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = generate_key(), generate_key()
    monkeypatch.setenv("INGEST_SECRET_KEY", old)
    _add_shop(runner)

    monkeypatch.setenv("INGEST_SECRET_KEY", f"{new},{old}")
    rotated = runner.invoke(cli, ["secrets", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    assert "re-encrypted 2 secret(s)" in rotated.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.app_secret_encrypted is not None
    assert SecretBox([new]).decrypt(stored.api_key_encrypted) == "k"
    assert SecretBox([new]).decrypt(stored.app_secret_encrypted) == "a"

    # With only a key that never encrypted them, the secrets cannot be read: one line.
    monkeypatch.setenv("INGEST_SECRET_KEY", generate_key())
    lost = runner.invoke(cli, ["secrets", "rotate"])
    assert lost.exit_code == 2
    assert "INGEST_SECRET_KEY" in lost.output and "Traceback" not in lost.output


def test_secrets_generate_key_prints_one_fernet_key() -> None:
    printed = CliRunner().invoke(cli, ["secrets", "generate-key"])
    assert printed.exit_code == 0
    SecretBox([printed.stdout.strip()])


def test_a_server_database_without_a_key_refuses_to_store_secrets_in_one_line(
    runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite generates its key")
    monkeypatch.delenv("INGEST_SECRET_KEY")
    added = runner.invoke(cli, [*ADD_SHOP, "--api-key", "k", "--app-secret", "a"])
    assert added.exit_code == 2
    assert "INGEST_SECRET_KEY" in added.output and "Traceback" not in added.output
    assert _stored_instance(database_url, "shop") is None


def test_a_new_api_key_for_a_disconnected_instance_says_how_to_connect_it(
    runner: CliRunner,
) -> None:
    _add_shop(runner)
    assert runner.invoke(cli, ["instance", "disconnect", "shop"]).exit_code == 0
    updated = runner.invoke(cli, ["instance", "update", "shop", "--api-key", "k2"])
    assert updated.exit_code == 0, updated.output
    assert "ingest instance connect shop" in updated.stderr
