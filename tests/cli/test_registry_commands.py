from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from ingest.accounts import hash_secret
from ingest.db import make_engine, make_session_factory
from ingest.models import ApiToken


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
