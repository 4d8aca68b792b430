from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli import registry
from cli.main import cli
from ingest.accounts import hash_secret
from ingest.db import make_engine, make_session_factory
from ingest.models import ApiToken, Instance
from tests.factories import make_media_item


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> CliRunner:
    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("INGEST_DATABASE_URL", database_url)
    return CliRunner()


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
    assert stored is not None
    assert (stored.api_key, stored.app_secret, stored.verify_token) == (
        "env-api-key",
        "env-app-secret",
        "env-verify-token",
    )
    assert not any(secret in added.output for secret in env.values())


def test_a_flag_still_wins_over_the_environment(runner: CliRunner, database_url: str) -> None:
    added = runner.invoke(
        cli, [*ADD_SHOP, "--api-key", "flag-key"], env={"INGEST_INSTANCE_API_KEY": "env-key"}
    )
    assert added.exit_code == 0, added.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.api_key == "flag-key"


def test_a_missing_api_key_is_prompted_for_without_echo_on_a_terminal(
    runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_interactive", lambda: True)
    added = runner.invoke(cli, ADD_SHOP, input="typed-key\n")
    assert added.exit_code == 0, added.output
    assert "typed-key" not in added.output
    stored = _stored_instance(database_url, "shop")
    assert stored is not None and stored.api_key == "typed-key"


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
    added = runner.invoke(cli, [*ADD_SHOP, "--api-key", "k"])
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
