from pathlib import Path

import pytest

from ingest.settings import ConfigError, Settings, load_settings


def test_embedded_defaults_live_under_var(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'ingest.sqlite3'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.sqlite3'}"
    assert settings.storage_url == (tmp_path / "var" / "media").as_uri()
    assert settings.redis_url is None


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql+psycopg://db/ingest")
    monkeypatch.setenv("INGEST_MEDIA_HOSTS", "a.example, B.example")
    settings = load_settings()
    assert settings.database_url == "postgresql+psycopg://db/ingest"
    assert settings.media_hosts == ["a.example", "b.example"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("INGEST_DATABASE_URL", "mysql://nope"),
        ("INGEST_STORAGE_URL", "ftp://host/x"),
        ("INGEST_STORAGE_URL", "s3:///no-bucket"),
        ("INGEST_GRAPH_URL", "not a url"),
        ("INGEST_REDIS_URL", "http://localhost"),
        ("INGEST_WEBHOOK_MAX_BYTES", "-1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert variable in message
