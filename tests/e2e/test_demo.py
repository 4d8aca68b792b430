"""``ingest demo``: its pieces, one real run that starts the embedded service itself, and
one against a running service (its one-line refusals, cleanup, and ``ingest sandbox send``)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cli import demo, demo_summary, demo_verify
from ingest.db import make_engine, make_session_factory
from ingest.events import parse_body
from ingest.intake import signature_valid
from ingest.models import ApiToken, Instance, MediaItem, MediaState, Provider
from sandbox import payloads
from sandbox.payloads import sign
from sandbox.processes import INGEST, ProcessGroup, child_environment, free_port
from sandbox.provider import SandboxMedia
from sandbox.server import media_hosts_for
from sandbox.stacks import StackEnv, embedded_stack_env


def _media(kind: str = "image", size: int = 1000) -> SandboxMedia:
    return SandboxMedia(
        media_type=kind,
        media_id="123",
        phone_number_id="5550001",
        sha256="ab" * 32,
        sha256_b64=base64.b64encode(bytes.fromhex("ab" * 32)).decode(),
        mime_type="image/jpeg",
        file_size=size,
        url="http://127.0.0.1:1/whatsapp_business/attachments/?mid=1&hash=secret",
    )


def test_plan_has_every_type_with_sizes_in_their_ranges() -> None:
    planned = demo.plan(200, seed=7)
    assert len(planned) == 200
    kinds = Counter(kind for kind, _ in planned)
    assert set(kinds) == set(demo.MEDIA_MIX)
    assert kinds["image"] > kinds["video"]  # the mix is weighted like real traffic
    for kind, size in planned:
        low, high = demo.MEDIA_MIX[kind][1]
        assert low <= size <= high
    assert demo.plan(200, seed=7) == planned  # reproducible
    assert {kind for kind, _ in demo.plan(5, seed=1)} == set(demo.MEDIA_MIX)


def test_webhook_body_is_signed_over_its_exact_bytes_and_parses() -> None:
    message = payloads.varied_message(_media("document"), "wamid.X1", "15550001111", 3)
    body = payloads.webhook_body("5550001", message)
    signature = sign(body, "app-secret")
    assert signature_valid(body, signature, "app-secret")
    assert not signature_valid(body + b" ", signature, "app-secret")
    parsed = parse_body(body)
    assert "secret" not in repr(parsed)  # the signed URL stays out of reprs
    (event,) = parsed.media
    assert (event.message_id, event.media_type, event.filename) == (
        "wamid.X1",
        "document",
        "demo-3.pdf",
    )
    assert event.sha256 == "ab" * 32
    assert b"demo document 3 \\u2713" in body  # non-ASCII escaped, as Meta signs it


def test_summary_counts_loss_and_corruption_and_fails_the_run() -> None:
    now = datetime.now(UTC)
    good = demo_verify.Sent(
        _media(), "w1", now, 200, MediaState.STORED, None, now + timedelta(seconds=1)
    )
    good.verified = True
    corrupt = demo_verify.Sent(
        _media(), "w2", now, 200, MediaState.STORED, None, now + timedelta(2)
    )
    corrupt.verified, corrupt.problem = False, "bytes differ from the provider's"
    lost = demo_verify.Sent(_media("video"), "w3", now, 200, MediaState.FAILED, "provider_error")

    summary = demo_summary.summarise([good, corrupt, lost], Provider.CLOUD, "http://x", False)
    assert summary["sent"] == 3 and summary["stored"] == 2 and summary["verified"] == 1
    assert summary["corrupted"] == 1 and summary["lost"] == 1
    assert summary["failed_by_reason"] == {"provider_error": 1}
    assert summary["seconds_to_stored"]["p50"] is not None
    assert not demo_summary.demo_ok(summary)

    ok = demo_summary.summarise([good], Provider.CLOUD, "http://x", False)
    assert demo_summary.demo_ok(ok)
    assert "secret" not in json.dumps(ok)


@pytest.mark.e2e
def test_demo_starts_the_embedded_service_and_verifies_every_item() -> None:
    if importlib.util.find_spec("sandbox.server") is None:
        pytest.skip("the sandbox provider (sandbox.server) has not landed yet")
    nobody = f"http://127.0.0.1:{free_port()}"
    completed = subprocess.run(
        [INGEST, "demo", "--events", "6", "--json", "--url", nobody, "--timeout", "60"],
        env=child_environment({}),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-2000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["embedded_service"] is True
    assert summary["sent"] == summary["stored"] == summary["verified"] == 6
    assert summary["lost"] == 0 and summary["corrupted"] == 0
    assert set(summary["by_type"]) == set(demo.MEDIA_MIX)
    assert summary["token_rate_limit"] == "100000/minute" and summary["api_throttled"] == 0
    # Six items and the probe, removed with the instance (and the temporary directory).
    assert summary["cleanup"]["removed"] == {"media_rows": 7, "objects": 7, "tokens": 0}
    assert "hash=" not in completed.stdout + completed.stderr


def _demo(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INGEST, "demo", *args],
        env=child_environment(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _one_line_error(completed: subprocess.CompletedProcess[str]) -> str:
    """The demo stopped with exit status 2 and one line on stderr (no traceback)."""
    assert completed.returncode == 2, completed.stderr[-3000:] + completed.stdout[-2000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
    return lines[0]


def _count(stack: StackEnv, model: Any, *where: Any) -> int:
    engine = make_engine(stack.database_url)
    try:
        with make_session_factory(engine)() as session:
            query = select(func.count()).select_from(model)
            return session.scalar(query.where(*where) if where else query) or 0
    finally:
        engine.dispose()


@pytest.mark.e2e
def test_demo_and_sandbox_send_against_a_running_service(
    stack_processes: ProcessGroup, embedded_stack: StackEnv, tmp_path: Path
) -> None:
    """A service started like `make run` (its own sandbox, the deployment's rate limit low):
    the demo's one-line refusals, a run that verifies everything and cleans up after itself,
    --keep, and the README's `ingest sandbox send` sequence up to a 200 base64 answer."""
    group = stack_processes
    sandbox_root = group.sandbox().base_url
    assert sandbox_root is not None
    service_env = {
        **embedded_stack.env,
        "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
        "INGEST_D360_URL": f"{sandbox_root}/d360",
        "INGEST_MEDIA_HOSTS": ",".join(media_hosts_for(sandbox_root)),
        # Far below what the demo reads back: only the demo token's own limit lets it through.
        "INGEST_API_RATE_LIMIT": "5/minute",
        "INGEST_RECONCILE_INTERVAL_SECONDS": "5",
    }
    group.env = service_env
    web = group.web()
    group.worker(concurrency=4, processes=1)
    group.beat()
    url = web.base_url
    assert url is not None
    sandbox_port = sandbox_root.rsplit(":", 1)[1]

    # Started elsewhere than the service's directory: its ./var database is not there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = _one_line_error(_demo("--url", url, "--events", "1", env={}, cwd=elsewhere))
    assert "`make run`" in line and "INGEST_VAR_DIR" in line and "--url" in line
    assert not (elsewhere / "var").exists()

    # Another database than the service's: its archive API does not know the demo's token.
    other = embedded_stack_env(tmp_path / "other")
    line = _one_line_error(
        _demo("--url", url, "--events", "1", "--sandbox", sandbox_root, env=other.env)
    )
    assert "does not know the demo's token (401)" in line and "INGEST_DATABASE_URL" in line

    # No sandbox where the service's may be (`make run` on other ports, SANDBOX_PORT unset).
    nowhere = {**embedded_stack.env, "SANDBOX_PORT": str(free_port())}
    line = _one_line_error(_demo("--url", url, "--events", "1", env=nowhere))
    assert "no sandbox answers" in line and "--sandbox URL" in line and "SANDBOX_PORT" in line

    # The right database, another sandbox than the one the service downloads from.
    stray = group.sandbox().base_url
    assert stray is not None
    line = _one_line_error(
        _demo("--url", url, "--events", "1", "--sandbox", stray, env=embedded_stack.env)
    )
    assert f"INGEST_GRAPH_URL={stray}/v21.0 INGEST_D360_URL={stray}/d360" in line
    stray_hosts = ",".join(media_hosts_for(stray))
    assert f"INGEST_MEDIA_HOSTS={stray_hosts}" in line and "--sandbox URL" in line
    assert _count(embedded_stack, Instance) == 0  # every refused run removed its instance

    # Right: the sandbox found as `make run`'s (SANDBOX_PORT), every item verified although
    # the deployment allows 5 requests a minute per token, and nothing left behind.
    demo_env = {**embedded_stack.env, "SANDBOX_PORT": sandbox_port}
    completed = _demo("--url", url, "--events", "10", "--json", env=demo_env)
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-2000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["embedded_service"] is False and summary["sandbox"] == sandbox_root
    assert summary["sent"] == summary["stored"] == summary["verified"] == 10
    assert summary["token_rate_limit"] == "100000/minute" and summary["api_throttled"] == 0
    assert summary["cleanup"]["removed"] == {"media_rows": 11, "objects": 11, "tokens": 0}
    assert _count(embedded_stack, Instance) == 0 and _count(embedded_stack, MediaItem) == 0
    assert _count(embedded_stack, ApiToken) == 0
    media_root = Path(embedded_stack.storage_url.removeprefix("file://"))
    assert [p for p in media_root.rglob("*") if p.is_file()] == []
    assert "\r" not in completed.stderr  # no progress bar outside a terminal

    # --keep: the instance, its token and its rows stay, and the summary says how to look.
    kept = _demo("--url", url, "--events", "1", "--keep", env=demo_env)
    assert kept.returncode == 0, kept.stderr[-3000:] + kept.stdout[-2000:]
    instance = next(n for n in kept.stderr.split() if n.startswith("demo-"))
    assert f"ingest media list --instance {instance}" in kept.stdout
    assert _count(embedded_stack, MediaItem) == 2 and _count(embedded_stack, ApiToken) == 1

    # The README's first steps: an instance with any key, a token, one item sent by the
    # sandbox (which is told the key), stored, and read back as base64.
    readme_env = {
        **embedded_stack.env,
        "SANDBOX_PORT": sandbox_port,
        "INGEST_INSTANCE_API_KEY": "sandbox-key",
        "INGEST_INSTANCE_APP_SECRET": "sandbox-app-secret",
    }
    group.run(
        "instance", "add", "shop", "--provider", "cloud", "--phone-number-id", "1234567890",
        env=readme_env,
    )  # fmt: skip
    token = group.run("token", "create", "--instance", "shop", env=readme_env)
    token_value = token.stdout.strip().splitlines()[-1]
    sent = group.run("sandbox", "send", "--instance", "shop", "--url", url, env=readme_env)
    message_id = sent.stdout.strip()  # alone on stdout; what happened is on stderr
    sha256 = sent.stderr.split("sha256 ", 1)[1].split()[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = group.run("media", "list", "--instance", "shop", env=readme_env).stdout
        if f"{message_id}\timage\tstored" in listed:
            break
        time.sleep(0.5)
    assert f"{message_id}\timage\tstored" in listed, listed
    answer = httpx.get(
        f"{url}/api/chat/base64/shop",
        params={"messageId": message_id},
        headers={"token": token_value},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    data = base64.b64decode(answer.json()["base64"])
    assert hashlib.sha256(data).hexdigest() == sha256
    listed = group.run("instance", "list", env=readme_env).stdout
    assert "shop\tcloud\t1234567890\tconnected" in listed  # the sandbox knew the key
