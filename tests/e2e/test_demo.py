"""``ingest demo``: its pieces, and one real run that starts the embedded service itself."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from cli import demo
from ingest.events import parse_body
from ingest.intake import signature_valid
from ingest.models import MediaState, Provider
from sandbox.payloads import sign
from tests.plugins.processes import INGEST, child_environment, free_port


def _media(kind: str = "image", size: int = 1000) -> demo.SandboxMedia:
    return demo.SandboxMedia(
        media_type=kind,
        media_id="123",
        sha256_hex="ab" * 32,
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
    message = demo.media_message(_media("document"), "wamid.X1", "15550001111", 3)
    body = demo.webhook_body("5550001", message)
    signature = sign("app-secret", body)
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
    good = demo.Sent(_media(), "w1", now, 200, MediaState.STORED, None, now + timedelta(seconds=1))
    good.verified = True
    corrupt = demo.Sent(_media(), "w2", now, 200, MediaState.STORED, None, now + timedelta(2))
    corrupt.verified, corrupt.problem = False, "bytes differ from the provider's"
    lost = demo.Sent(_media("video"), "w3", now, 200, MediaState.FAILED, "provider_error")

    summary = demo.summarise([good, corrupt, lost], Provider.CLOUD, "http://x", False)
    assert summary["sent"] == 3 and summary["stored"] == 2 and summary["verified"] == 1
    assert summary["corrupted"] == 1 and summary["lost"] == 1
    assert summary["failed_by_reason"] == {"provider_error": 1}
    assert summary["seconds_to_stored"]["p50"] is not None
    assert not demo.demo_ok(summary)

    ok = demo.summarise([good], Provider.CLOUD, "http://x", False)
    assert demo.demo_ok(ok)
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
    assert "hash=" not in completed.stdout + completed.stderr
