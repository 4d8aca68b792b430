"""Downstream callbacks through real web and worker processes: a receiver hears, correctly
signed, of a stored item and of a failed one, and is sent an event again after a 500."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from standardwebhooks import Webhook

from cli.demo_embedded import in_process_sandbox
from ingest import callbacks
from ingest.db import make_engine, make_session_factory, session_scope
from ingest.models import MediaState, Provider
from ingest.secrets import secret_box
from sandbox.client import SandboxControl
from sandbox.processes import ProcessGroup
from sandbox.registration import register
from sandbox.stacks import StackEnv
from tests.e2e.test_pipeline_e2e import post_media, provider_env, wait_final
from tests.plugins.wsgi import wsgi_server

pytestmark = pytest.mark.e2e


class Receiver:
    """A callback receiver: answers 500 to the first delivery and 204 to every other."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        headers["content-type"] = environ.get("CONTENT_TYPE", "")
        with self._lock:
            self.requests.append((headers, body))
            first = len(self.requests) == 1
        start_response("500 Oops" if first else "204 No Content", [("Content-Length", "0")])
        return [b""]

    def snapshot(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self.requests)


@pytest.fixture
def sandbox() -> Iterator[tuple[str, SandboxControl]]:
    with in_process_sandbox() as root:
        control = SandboxControl(root)
        try:
            yield root, control
        finally:
            control.close()


def test_a_receiver_gets_signed_events_for_a_stored_and_a_failed_item_and_a_retry(
    embedded_stack: StackEnv,
    stack_processes: ProcessGroup,
    sandbox: tuple[str, SandboxControl],
) -> None:
    sandbox_root, control = sandbox
    receiver = Receiver()
    with wsgi_server(receiver) as receiver_url:
        port = receiver_url.rsplit(":", 1)[1]
        stack_processes.env = {
            **embedded_stack.env,
            **provider_env(
                sandbox_root,
                INGEST_CALLBACK_PRIVATE_ADDRESSES=f"127.0.0.1:{port}",
                INGEST_CALLBACK_INTERVAL_SECONDS="0.5",
            ),
        }
        settings = embedded_stack.settings()
        reg = register(settings, Provider.CLOUD)
        engine = make_engine(settings.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                secret = callbacks.configure(
                    session,
                    reg.instance,
                    f"{receiver_url}/hooks/media?token=t0ken",
                    None,
                    secret_box(settings),
                )
        finally:
            engine.dispose()
        assert secret is not None
        control.add_number(reg.phone_number_id, reg.api_key)
        good = control.add_media(reg.phone_number_id, "image", 20_000)
        bad = control.add_media(reg.phone_number_id, "image", 20_000)
        # Every copy of this one is corrupted: its checksum never matches, and it fails.
        control.http.post(
            "/_sandbox/faults", json={"media_id": bad.media_id, "corrupt": True}
        ).raise_for_status()

        web = stack_processes.web()
        worker = stack_processes.worker(concurrency=2)
        assert web.base_url is not None
        stored_wamid = post_media(web.base_url, reg, good, 0)
        failed_wamid = post_media(web.base_url, reg, bad, 1)

        rows = wait_final(settings, [stored_wamid, failed_wamid])
        assert rows[stored_wamid].state == MediaState.STORED
        assert (rows[failed_wamid].state, rows[failed_wamid].failure_reason) == (
            MediaState.FAILED,
            "checksum_mismatch",
        )

        # Two events, the first POST answered 500 and sent again: three requests at least.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and len(receiver.snapshot()) < 3:
            if not worker.alive():
                raise worker.fail("worker exited")
            time.sleep(0.2)
        requests = receiver.snapshot()

    assert len(requests) == 3, stack_processes.report()
    verifier = Webhook(secret)
    events = []
    for headers, body in requests:
        document = verifier.verify(body, headers)  # raises unless correctly signed
        assert json.loads(body) == document
        events.append((headers["webhook-id"], document))
        assert headers["content-type"] == "application/json"

    # The 500 was answered to the first POST; the same event came again, same id.
    first_id = events[0][0]
    assert [event_id for event_id, _ in events].count(first_id) == 2
    assert events[0][1] == next(doc for eid, doc in events[1:] if eid == first_id)

    by_type = {document["type"]: document["data"] for _, document in events}
    assert set(by_type) == {"media.stored", "media.failed"}
    stored = by_type["media.stored"]
    assert (stored["instance"], stored["messageId"], stored["state"]) == (
        reg.instance,
        stored_wamid,
        "stored",
    )
    assert (stored["sha256"], stored["size"]) == (good.sha256, good.file_size)
    assert stored["paths"]["base64"] == (
        f"/api/chat/base64/{reg.instance}?messageId={stored_wamid}"
    )
    failed = by_type["media.failed"]
    assert (failed["messageId"], failed["state"], failed["reason"]) == (
        failed_wamid,
        "failed",
        "checksum_mismatch",
    )
    # Nothing the receiver should not have: no bytes, no URL with credentials.
    for _, body in requests:
        text = body.decode()
        assert "t0ken" not in text and reg.api_key not in text and "http" not in text

    log = worker.log()
    assert "outcome=retry status=500" in log
    assert "t0ken" not in log
