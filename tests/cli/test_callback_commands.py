"""`ingest instance update --callback-url` and its secret: from the environment, kept, or
generated and shown once; `--no-callback-url`; the listing shows the origin only."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli.main import cli
from ingest import callbacks
from ingest.db import make_engine, make_session_factory
from ingest.models import Instance
from ingest.secrets import secret_box
from ingest.settings import load_settings
from tests.factories import make_instance

V2 = "https://hooks.example.com/v2"


@pytest.fixture
def shop(runner: CliRunner, database_url: str) -> str:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            return make_instance(session, name="shop").name
    finally:
        engine.dispose()


def _stored(database_url: str) -> tuple[str | None, str | None]:
    """(url, secret in clear) as the worker will read them."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            row = session.scalar(select(Instance).where(Instance.name == "shop"))
            assert row is not None
            secret = row.callback_secret_encrypted
            clear = secret_box(load_settings()).decrypt(secret) if secret else None
            return row.callback_url, clear
    finally:
        engine.dispose()


def test_a_new_secret_is_shown_once_then_kept(
    runner: CliRunner, database_url: str, shop: str
) -> None:
    first = runner.invoke(
        cli, ["instance", "update", shop, "--callback-url", "https://hooks.example.com/in?t=1"]
    )
    assert first.exit_code == 0, first.output
    shown = first.stdout.strip().splitlines()[-1]
    assert shown.startswith(callbacks.SECRET_PREFIX)
    url, secret = _stored(database_url)
    assert (url, secret) == ("https://hooks.example.com/in?t=1", shown)

    # Another URL: the receiver keeps its secret, and nothing is printed.
    moved = runner.invoke(cli, ["instance", "update", shop, "--callback-url", V2])
    assert moved.exit_code == 0, moved.output
    assert callbacks.SECRET_PREFIX not in moved.stdout
    assert _stored(database_url) == (V2, shown)

    listed = runner.invoke(cli, ["instance", "list"])
    assert "callback=https://hooks.example.com" in listed.output
    assert "/v2" not in listed.output and shown not in listed.output

    rotated = runner.invoke(
        cli,
        ["instance", "update", shop, "--callback-url", V2, "--new-callback-secret"],
    )
    assert rotated.exit_code == 0, rotated.output
    fresh = rotated.stdout.strip().splitlines()[-1]
    assert fresh.startswith(callbacks.SECRET_PREFIX) and fresh != shown
    assert _stored(database_url)[1] == fresh

    removed = runner.invoke(cli, ["instance", "update", shop, "--no-callback-url"])
    assert removed.exit_code == 0, removed.output
    assert _stored(database_url) == (None, None)


def test_the_secret_comes_from_the_environment(
    runner: CliRunner, database_url: str, shop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = callbacks.new_secret()
    monkeypatch.setenv("INGEST_INSTANCE_CALLBACK_SECRET", given)
    done = runner.invoke(
        cli, ["instance", "update", shop, "--callback-url", "https://hooks.example.com/"]
    )
    assert done.exit_code == 0, done.output
    assert given not in done.output
    assert _stored(database_url)[1] == given
    # Left over in the environment, it changes nothing else.
    other = runner.invoke(cli, ["instance", "update", shop, "--retention-days", "9"])
    assert other.exit_code == 0, other.output
    assert "callback" not in other.output


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example.com/", "http"),
        ("https://user:pw@hooks.example.com/", "user"),
        ("https:///nohost", "host"),
    ],
)
def test_a_bad_url_is_one_clear_line(
    runner: CliRunner, database_url: str, shop: str, url: str, why: str
) -> None:
    refused = runner.invoke(cli, ["instance", "update", shop, "--callback-url", url])
    assert refused.exit_code == 1
    assert why in refused.output.lower() and "Traceback" not in refused.output
    assert _stored(database_url) == (None, None)
