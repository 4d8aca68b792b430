from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path / "var"))
    return CliRunner()


def test_doctor_passes_on_a_migrated_embedded_setup(embedded: CliRunner) -> None:
    assert embedded.invoke(cli, ["db", "upgrade"]).exit_code == 0
    result = embedded.invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    for part in ("database", "broker", "storage", "redis"):
        assert part in result.output
    assert "FAIL" not in result.output


def test_doctor_names_the_broken_service(
    embedded: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGEST_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    assert embedded.invoke(cli, ["db", "upgrade"]).exit_code == 0
    result = embedded.invoke(cli, ["doctor"])
    assert result.exit_code == 1
    assert "FAIL  redis" in result.output
    assert "hunter2" not in result.output


def test_doctor_says_when_migrations_are_missing(embedded: CliRunner) -> None:
    result = embedded.invoke(cli, ["doctor"])
    assert result.exit_code == 1
    assert "ingest db upgrade" in result.output
