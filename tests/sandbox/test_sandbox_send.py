"""``ingest sandbox send``: one media item from the sandbox, announced by a signed webhook to a
real receiver, with the key the sandbox must know taken from the instance's row."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from cli.main import cli
from ingest.models import MediaItem, Provider
from ingest.queues import RecordingScheduler
from ingest.services import Services
from sandbox.processes import free_port
from sandbox.server import SandboxServer
from tests.factories import make_instance
from tests.plugins.wsgi import wsgi_server
from webhook.app import create_app


@pytest.fixture
def service(services: Services) -> Iterator[str]:
    """The real webhook receiver, served on a free port, on the test database."""
    app = create_app(services=services, scheduler=RecordingScheduler())
    with wsgi_server(app) as url:
        yield url


def _send(runner: CliRunner, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(cli, ["sandbox", "send", *args], env=env)


def _row(services: Services, message_id: str) -> MediaItem | None:
    with services.sessions() as session:
        return session.scalar(select(MediaItem).where(MediaItem.message_id == message_id))


def test_send_tells_the_sandbox_the_key_and_posts_a_signed_webhook(
    runner: CliRunner, services: Services, service: str, sandbox: SandboxServer
) -> None:
    with services.sessions.begin() as session:
        make_instance(
            session, name="shop", phone_number_id="1234567890", api_key="k1", app_secret="s1"
        )

    result = _send(runner, "--instance", "shop", "--sandbox", sandbox.base_url, "--url", service)

    assert result.exit_code == 0, result.output
    message_id = result.stdout.strip()  # the only line on stdout
    assert message_id.startswith("wamid.") and " " not in message_id
    row = _row(services, message_id)  # the receiver checked X-Hub-Signature-256 with s1
    assert row is not None and row.media_type == "image" and row.media_id is not None
    # The sandbox knows the instance's key, so the worker's download will not be a 401.
    number = sandbox.provider.number_for_key("k1", row.media_id)
    assert number is not None and number.phone_number_id == "1234567890"
    data = sandbox.media_bytes(row.media_id)
    assert row.declared_sha256 == hashlib.sha256(data).hexdigest()
    assert f"sha256 {row.declared_sha256}" in result.stderr
    assert "k1" not in result.output and "s1" not in result.output


def test_send_finds_the_sandbox_the_graph_url_names_and_takes_type_and_size(
    runner: CliRunner, services: Services, service: str, sandbox: SandboxServer
) -> None:
    with services.sessions.begin() as session:
        make_instance(session, name="shop", phone_number_id="1234567890", api_key="k1")

    result = _send(
        runner,
        *("--instance", "shop", "--type", "document", "--size", "50000", "--url", service),
        env={"INGEST_GRAPH_URL": sandbox.graph_url},
    )

    assert result.exit_code == 0, result.output
    row = _row(services, result.stdout.strip().splitlines()[-1])
    assert row is not None and row.media_type == "document" and row.media_id is not None
    assert len(sandbox.media_bytes(row.media_id)) == 50_000


def test_360dialog_needs_the_plain_webhook_secret_from_the_environment(
    runner: CliRunner, services: Services, service: str, sandbox: SandboxServer
) -> None:
    with services.sessions.begin() as session:
        make_instance(
            session,
            name="d360",
            provider=Provider.D360,
            phone_number_id="555",
            api_key="dk",
            webhook_secret_header="X-Webhook-Secret",
            webhook_secret="shared",
        )
    args = ("--instance", "d360", "--sandbox", sandbox.base_url, "--url", service)

    missing = _send(runner, *args)
    assert missing.exit_code == 2
    assert len(missing.output.strip().splitlines()) == 1
    assert "INGEST_INSTANCE_WEBHOOK_SECRET" in missing.output

    wrong = _send(runner, *args, env={"INGEST_INSTANCE_WEBHOOK_SECRET": "nope"})
    assert wrong.exit_code == 2 and "not the webhook secret" in wrong.output

    right = _send(runner, *args, env={"INGEST_INSTANCE_WEBHOOK_SECRET": "shared"})
    assert right.exit_code == 0, right.output
    assert f"{service}/webhook/d360 (200)" in right.stderr
    assert _row(services, right.stdout.strip().splitlines()[-1]) is not None


def test_what_to_fix_is_one_line(
    runner: CliRunner, services: Services, service: str, sandbox: SandboxServer
) -> None:
    with services.sessions.begin() as session:
        make_instance(session, name="shop", phone_number_id="1234567890", api_key="k1")

    unknown = _send(runner, "--instance", "nobody", "--sandbox", sandbox.base_url)
    assert unknown.exit_code == 2 and "no instance named 'nobody'" in unknown.output

    nowhere = f"http://127.0.0.1:{free_port()}"
    port = nowhere.rsplit(":", 1)[1]
    no_sandbox = _send(runner, "--instance", "shop", env={"SANDBOX_PORT": port})
    assert no_sandbox.exit_code == 2 and "--sandbox URL" in no_sandbox.output

    no_service = _send(
        runner, "--instance", "shop", "--sandbox", sandbox.base_url, "--url", nowhere
    )
    assert no_service.exit_code == 1 and f"no service answers at {nowhere}" in no_service.output

    for result in (unknown, no_sandbox):
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_send_elsewhere_than_make_run_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: SandboxServer
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["sandbox", "send", "--instance", "shop"])
    assert result.exit_code == 2
    assert "`make run`" in result.output and "INGEST_VAR_DIR" in result.output
    assert not (tmp_path / "var").exists()


def test_the_sandbox_group_still_serves_with_its_options() -> None:
    result = CliRunner().invoke(cli, ["sandbox", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.output and "--quiet" in result.output and "send" in result.output
