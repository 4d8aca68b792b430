"""``ingest demo``'s checks before it sends anything: which database, which sandbox, the probe.

Each problem ends the demo with one line saying what to set (exit status 2), never a
traceback or minutes of waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask, jsonify

from cli import demo, demo_checks
from cli.main import cli
from ingest.archive import NO_MEDIA
from ingest.models import MediaState
from ingest.settings import Settings
from sandbox import client
from tests.plugins.wsgi import wsgi_server

ROOT = "http://127.0.0.1:8091"


@pytest.fixture
def healthy_service() -> Iterator[str]:
    """Something that answers /healthz on a free port, as a running service would."""
    app = Flask("fake-service")
    app.get("/healthz")(lambda: jsonify({"status": "ok"}))
    with wsgi_server(app) as url:
        yield url


# --- item 2: started in another directory than `make run` ----------------------------------


def test_demo_elsewhere_than_make_run_is_one_line_and_exit_status_2(
    healthy_service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./var here: the embedded default database is missing
    result = CliRunner().invoke(cli, ["demo", "--events", "1", "--url", healthy_service])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    line = lines[0]
    assert str(tmp_path / "var" / "ingest.sqlite3") in line
    assert "`make run`" in line and "INGEST_VAR_DIR" in line and "--url" in line
    assert not (tmp_path / "var").exists()  # nothing created where the user stood


def test_database_problem_only_for_a_sqlite_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = Settings(var_dir=tmp_path / "var", broker_url="memory://")
    assert demo_checks.database_problem(missing, "http://svc") is not None
    assert demo_checks.missing_database(missing) == (tmp_path / "var" / "ingest.sqlite3").resolve()

    (tmp_path / "db.sqlite3").touch()
    present = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}", broker_url="memory://")
    assert demo_checks.database_problem(present, "http://svc") is None
    postgres = Settings(database_url="postgresql://u:pw@db/ingest", broker_url="memory://")
    assert demo_checks.database_problem(postgres, "http://svc") is None


# --- item 3: a service on another database, or downloading from another sandbox -------------


def test_find_message_404_not_found_means_the_same_database() -> None:
    url = "postgresql+psycopg://ingest:hunter2@db/ingest"
    assert demo_checks.shared_database_problem(404, NO_MEDIA, "http://svc", url) is None

    other = demo_checks.shared_database_problem(401, "Invalid token", "http://svc", url)
    assert other is not None
    assert "INGEST_DATABASE_URL" in other and "INGEST_VAR_DIR" in other
    assert "hunter2" not in other and "db/ingest" in other

    # An instance-not-found 404 is not the answer of a service that shares the database.
    assert demo_checks.shared_database_problem(404, "Not found", "http://svc", url) is not None


def _fix_for(root: str) -> str:
    return (
        f"INGEST_GRAPH_URL={root}/v21.0 INGEST_D360_URL={root}/d360 "
        f"INGEST_MEDIA_HOSTS={root.removeprefix('http://')}"
    )


def test_probe_stored_is_fine() -> None:
    assert (
        demo_checks.probe_problem(demo_checks.ProbeRow(MediaState.STORED), "http://svc", ROOT, 1.0)
        is None
    )


def test_probe_failed_on_the_allowlist_names_what_to_set() -> None:
    row = demo_checks.ProbeRow(
        MediaState.FAILED, "provider_error", "host 127.0.0.1 is not on the allowlist", 1
    )
    line = demo_checks.probe_problem(row, "http://svc", ROOT, 2.0)
    assert line is not None and "\n" not in line
    assert "provider_error" in line and "not on the allowlist" in line
    assert _fix_for(ROOT) in line and "--sandbox URL" in line


def test_probe_pending_after_a_401_names_instance_unauthorized() -> None:
    # A service whose INGEST_GRAPH_URL names another sandbox sends no key to this one: 401,
    # the instance is disconnected and the row waits for an operator.
    row = demo_checks.ProbeRow(
        MediaState.PENDING,
        None,
        "download answered 401",
        1,
        connected=False,
        disconnected_reason="instance_unauthorized: download answered 401",
    )
    line = demo_checks.probe_problem(row, "http://svc", ROOT, 20.0)
    assert line is not None
    assert "still pending after 20 s" in line and "instance_unauthorized" in line
    assert _fix_for(ROOT) in line


def test_probe_never_attempted_points_at_the_worker() -> None:
    line = demo_checks.probe_problem(
        demo_checks.ProbeRow(MediaState.PENDING), "http://svc", ROOT, 20.0
    )
    assert line is not None and "ingest worker" in line and "INGEST_BROKER_URL" in line


def test_probe_row_missing_points_at_the_database() -> None:
    line = demo_checks.probe_problem(demo_checks.ProbeRow(None), "http://svc", ROOT, 20.0)
    assert line is not None and "INGEST_DATABASE_URL" in line


def test_demo_errors_are_usage_errors() -> None:
    assert demo_checks.DemoError("x").exit_code == 2


# --- which sandbox ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [ROOT, ROOT + "/", ROOT + "/v21.0", ROOT + "/v21.0/", ROOT + "/d360", ROOT + "/v22"],
)
def test_sandbox_root_from_its_root_or_a_provider_url(given: str) -> None:
    assert client.sandbox_root_of(given) == ROOT


def test_default_sandboxes_graph_url_when_local_then_make_runs_port() -> None:
    local = client.default_sandbox_candidates(
        "http://localhost:9000/v21.0", {"SANDBOX_PORT": "8091"}
    )
    assert local == ["http://localhost:9000", "http://127.0.0.1:8091"]
    remote = client.default_sandbox_candidates("https://graph.facebook.com/v21.0", {})
    assert remote == ["http://127.0.0.1:8090"]


def test_no_sandbox_for_a_running_service_says_what_to_give_or_set() -> None:
    line = demo_checks.no_sandbox_problem(
        "http://svc", "https://graph.facebook.com/v21.0", {"SANDBOX_PORT": "8095"}
    )
    assert "\n" not in line and "http://127.0.0.1:8095" in line
    assert "--sandbox URL" in line and "SANDBOX_PORT=P" in line
    assert _fix_for("http://127.0.0.1:P") in line


def test_a_given_sandbox_that_does_not_answer_is_one_line() -> None:
    with pytest.raises(demo_checks.DemoError) as raised:
        demo_checks.find_sandbox("http://127.0.0.1:9/v21.0", "", {})
    assert "no sandbox answers at http://127.0.0.1:9 " in raised.value.message


def test_help_says_how_to_point_the_demo_at_a_service_and_a_sandbox() -> None:
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    for words in ("--sandbox", "INGEST_VAR_DIR", "INGEST_DATABASE_URL", "make run", "--keep"):
        assert words in result.output


def test_the_demo_runs_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    # tqdm comes with `make run`'s extra; an image without it still runs the demo.
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = demo._bar(10, "stored", quiet=False, position=0)
    bar.update(3)
    bar.update(2)
    assert bar.n == 5
    bar.close()
