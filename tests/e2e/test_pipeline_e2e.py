"""Media from a sandbox provider through real web, worker and beat processes into storage.

Skipped (with the reason) while a piece they need has not landed: the sandbox provider, the
download task, the archive API.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from cli.demo_embedded import in_process_sandbox
from ingest.db import make_engine, make_session_factory
from ingest.models import TERMINAL_STATES, MediaItem, MediaState, Provider, utcnow
from ingest.settings import Settings
from sandbox.client import SandboxControl
from sandbox.payloads import sign, varied_message, webhook_body
from sandbox.processes import ProcessGroup, free_port
from sandbox.provider import SandboxMedia
from sandbox.registration import SECRET_HEADER, DemoRegistration, register
from sandbox.server import media_hosts_for
from sandbox.stacks import StackEnv

pytestmark = pytest.mark.e2e

MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")
ROOT = Path(__file__).resolve().parents[2]


def _require_pieces() -> None:
    if importlib.util.find_spec("sandbox.server") is None:
        pytest.skip("the sandbox provider (sandbox.server) has not landed yet")
    if "DOWNLOAD_TASK" not in (ROOT / "tasks" / "media.py").read_text():
        pytest.skip("the download task (tasks/media.py) has not landed yet")
    if "base64" not in (ROOT / "webhook" / "archive.py").read_text():
        pytest.skip("the archive API (webhook/archive.py) has not landed yet")


@pytest.fixture
def sandbox_root() -> Iterator[str]:
    _require_pieces()
    with in_process_sandbox() as root:
        yield root


@pytest.fixture
def control(sandbox_root: str) -> Iterator[SandboxControl]:
    client = SandboxControl(sandbox_root)
    yield client
    client.close()


def provider_env(sandbox_root: str, **extra: str) -> dict[str, str]:
    return {
        "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
        "INGEST_D360_URL": f"{sandbox_root}/d360",
        "INGEST_MEDIA_HOSTS": ",".join(media_hosts_for(sandbox_root)),
        "INGEST_API_RATE_LIMIT": "100000/minute",
        "INGEST_RECONCILE_INTERVAL_SECONDS": "1",
        **extra,
    }


def post_media(web_url: str, reg: DemoRegistration, media: SandboxMedia, n: int) -> str:
    wamid = f"wamid.E2E{n:04d}{media.media_id}"
    body = webhook_body(reg.phone_number_id, varied_message(media, wamid, "15550001111", n))
    headers = {"Content-Type": "application/json"}
    if reg.app_secret:
        headers["X-Hub-Signature-256"] = sign(body, reg.app_secret)
        url = f"{web_url}/webhook"
    else:
        assert reg.webhook_secret is not None
        headers[SECRET_HEADER] = reg.webhook_secret
        url = f"{web_url}/webhook/{reg.instance}"
    response = httpx.post(url, content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return wamid


def wait_final(settings: Settings, wamids: list[str], timeout: float = 45) -> dict[str, Any]:
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + timeout
    rows: dict[str, Any] = {}
    try:
        while time.monotonic() < deadline:
            with sessions() as session:
                rows = {
                    row.message_id: row
                    for row in session.scalars(
                        select(MediaItem).where(MediaItem.message_id.in_(wamids))
                    )
                }
            if len(rows) == len(wamids) and all(r.state in TERMINAL_STATES for r in rows.values()):
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    return rows


def assert_served_byte_identical(
    web_url: str, reg: DemoRegistration, wamid: str, media: SandboxMedia
) -> None:
    response = httpx.get(
        f"{web_url}/api/chat/base64/{reg.instance}",
        params={"messageId": wamid},
        headers={"token": reg.token},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    data = base64.b64decode(body["base64"], validate=True)
    assert hashlib.sha256(data).hexdigest() == media.sha256
    assert len(data) == media.file_size
    assert body["media_type"] == media.media_type
    assert body["message_id"] == wamid


def test_every_media_type_on_both_providers_is_stored_and_served_identically(
    stack: StackEnv, stack_processes: ProcessGroup, sandbox_root: str, control: SandboxControl
) -> None:
    stack_processes.env = {**stack.env, **provider_env(sandbox_root)}
    web = stack_processes.web()
    worker = stack_processes.worker(concurrency=8)
    assert web.base_url is not None
    settings = stack.settings()

    sent: list[tuple[DemoRegistration, str, SandboxMedia]] = []
    for provider in (Provider.CLOUD, Provider.D360):
        reg = register(settings, provider)
        control.add_number(reg.phone_number_id, reg.api_key, provider)
        for n, kind in enumerate(MEDIA_TYPES):
            media = control.add_media(reg.phone_number_id, kind, 30_000 + n * 7_001)
            sent.append((reg, post_media(web.base_url, reg, media, n), media))

    rows = wait_final(settings, [wamid for _, wamid, _ in sent])
    states = {wamid: (row.state, row.failure_reason) for wamid, row in rows.items()}
    assert all(state == (MediaState.STORED, None) for state in states.values()), states
    for reg, wamid, media in sent:
        row = rows[wamid]
        assert row.actual_sha256 == media.sha256
        assert row.size == media.file_size
        assert row.download_url is None  # the signed URL is gone once used
        assert_served_byte_identical(web.base_url, reg, wamid, media)
    # One log line per attempt, ours; not Celery's "received"/"succeeded" pair besides it.
    log = worker.log()
    assert log.count("outcome=stored") == len(sent)
    assert "Task ingest.download_" not in log


def test_rows_committed_without_a_broker_or_worker_are_all_stored_once_a_worker_runs(
    embedded_stack: StackEnv,
    stack_processes: ProcessGroup,
    sandbox_root: str,
    control: SandboxControl,
) -> None:
    """The web never needs the broker: it commits and answers. A worker that starts later
    relays the rows it finds; a row whose wake-up was stamped but never sent (a relay killed
    between the two) is the reconciler's."""
    stack_processes.env = {**embedded_stack.env, **provider_env(sandbox_root)}
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    web = stack_processes.web(env={"INGEST_BROKER_URL": nowhere})
    assert web.base_url is not None
    settings = embedded_stack.settings()
    reg = register(settings, Provider.CLOUD)
    control.add_number(reg.phone_number_id, reg.api_key)
    sent = []
    for n, kind in enumerate(("image", "document", "audio")):
        media = control.add_media(reg.phone_number_id, kind, 20_000)
        sent.append((post_media(web.base_url, reg, media, n), media))

    pending = wait_final(settings, [w for w, _ in sent], timeout=1)
    assert {row.state for row in pending.values()} == {MediaState.PENDING}
    lost_stamp = sent[0][0]
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                update(MediaItem)
                .where(MediaItem.message_id == lost_stamp)
                .values(enqueued_at=utcnow() - timedelta(hours=1))
            )
    finally:
        engine.dispose()

    stack_processes.worker(concurrency=4)
    stack_processes.beat()
    rows = wait_final(settings, [w for w, _ in sent])
    assert {w: r.state for w, r in rows.items()} == dict.fromkeys(
        (w for w, _ in sent), MediaState.STORED
    )
    for wamid, media in sent:
        assert_served_byte_identical(web.base_url, reg, wamid, media)


def _stored_objects(storage_root: Path) -> list[Path]:
    return [
        p
        for p in storage_root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".meta.json")
    ]


def test_worker_killed_mid_download_loses_nothing_and_leaves_one_object(
    embedded_stack: StackEnv,
    stack_processes: ProcessGroup,
    sandbox_root: str,
    control: SandboxControl,
) -> None:
    # Short limits so the dead worker's lease runs out quickly; the reconciler then wakes a
    # new worker for the row.
    stack_processes.env = {
        **embedded_stack.env,
        **provider_env(
            sandbox_root,
            INGEST_TASK_SOFT_TIME_LIMIT="8",
            INGEST_TASK_TIME_LIMIT="9",
            INGEST_LEASE_SECONDS="10",
        ),
    }
    web = stack_processes.web()
    assert web.base_url is not None
    settings = embedded_stack.settings()
    reg = register(settings, Provider.CLOUD)
    control.add_number(reg.phone_number_id, reg.api_key)
    media = control.add_media(reg.phone_number_id, "document", 600_000)
    # Throttled: the download takes about 3 s, long enough to be killed in the middle.
    control.http.post(
        "/_sandbox/faults", json={"media_id": media.media_id, "bandwidth": 200_000}
    ).raise_for_status()
    worker = stack_processes.worker(concurrency=2)
    wamid = post_media(web.base_url, reg, media, 0)

    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    try:
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline and state != MediaState.DOWNLOADING:
            with sessions() as session:
                state = session.scalar(select(MediaItem.state).where(MediaItem.message_id == wamid))
            time.sleep(0.05)
        assert state == MediaState.DOWNLOADING
        time.sleep(0.5)  # some bytes are in flight
        worker.kill()
    finally:
        engine.dispose()

    # Unthrottled from now on; a fresh worker and the reconciler finish the job.
    control.http.post(
        "/_sandbox/faults", json={"media_id": media.media_id, "bandwidth": None}
    ).raise_for_status()
    stack_processes.worker(concurrency=2)
    stack_processes.beat()
    rows = wait_final(settings, [wamid], timeout=40)
    row = rows[wamid]
    assert (row.state, row.failure_reason) == (MediaState.STORED, None)
    assert row.attempts >= 2
    assert_served_byte_identical(web.base_url, reg, wamid, media)
    objects = _stored_objects(Path(embedded_stack.env["INGEST_VAR_DIR"]) / "media")
    assert len(objects) == 1, objects
    assert hashlib.sha256(objects[0].read_bytes()).hexdigest() == media.sha256


def test_a_slow_reader_of_a_large_base64_body_does_not_hold_up_the_web_process(
    stack: StackEnv, stack_processes: ProcessGroup, sandbox_root: str, control: SandboxControl
) -> None:
    stack_processes.env = {**stack.env, **provider_env(sandbox_root)}
    # One web process: whatever the slow reader holds, the other requests need the same one.
    web = stack_processes.web(workers=1)
    stack_processes.worker(concurrency=2)
    assert web.base_url is not None
    settings = stack.settings()
    reg = register(settings, Provider.CLOUD)
    control.add_number(reg.phone_number_id, reg.api_key)
    # Its base64 (32 MB) is far more than the loopback socket buffers hold for a reader
    # that has stopped reading, so the server side stays in the middle of sending it.
    big = control.add_media(reg.phone_number_id, "document", 24 * 1024 * 1024)
    small = control.add_media(reg.phone_number_id, "image", 20_000)
    wamids = [post_media(web.base_url, reg, media, n) for n, media in enumerate((big, small))]
    rows = wait_final(settings, wamids, timeout=90)
    assert {row.state for row in rows.values()} == {MediaState.STORED}

    with (
        httpx.Client(timeout=30) as slow,
        slow.stream(
            "GET",
            f"{web.base_url}/api/chat/base64/{reg.instance}",
            params={"messageId": wamids[0]},
            headers={"token": reg.token},
        ) as response,
    ):
        assert response.status_code == 200
        pieces = response.iter_bytes()
        received = [next(pieces)]
        # The slow reader pauses mid-body; the same web process still answers others.
        health = httpx.get(f"{web.base_url}/healthz", timeout=5)
        assert health.status_code == 200
        assert_served_byte_identical(web.base_url, reg, wamids[1], small)
        received.extend(pieces)
    body = json.loads(b"".join(received))
    data = base64.b64decode(body["base64"], validate=True)
    assert hashlib.sha256(data).hexdigest() == big.sha256
