"""The sandbox provider: real media, signed URL expiry, error throttle, faults, control API."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filetype
import httpx
import pytest
from PIL import Image

from ingest.egress import Egress
from ingest.events import is_attachment_url, parse_body
from ingest.models import Provider
from ingest.providers import Credentials, client_for
from sandbox import payloads
from sandbox.samples import SAMPLES, Blob, Sample, sample_for
from sandbox.server import SandboxServer, media_hosts_for, start_sandbox

PHONE, KEY = "40001", "sandbox-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def http(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, timeout=10.0) as client:
        yield client


@pytest.fixture
def number(sandbox: SandboxServer) -> SandboxServer:
    sandbox.add_number(PHONE, KEY)
    return sandbox


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.filename)
@pytest.mark.parametrize("extra", [0, 1, 7, 8, 9, 150_001])
def test_media_sniff_as_their_type_at_any_size(sample: Sample, extra: int) -> None:
    natural = len(sample.data())
    blob = Blob.build(sample, natural + extra, seed=5)
    data = blob.read()
    assert len(data) == natural + extra
    assert hashlib.sha256(data).hexdigest() == blob.sha256
    mime = sample.mime_type.split(";")[0]
    assert filetype.guess_mime(data) == mime
    if mime.startswith("image/"):
        Image.open(io.BytesIO(data)).load()  # still decodes with the padding


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    sample = sample_for("document")
    assert Blob.build(sample, 50_000, 1).sha256 == Blob.build(sample, 50_000, 1).sha256
    assert Blob.build(sample, 50_000, 1).sha256 != Blob.build(sample, 50_000, 2).sha256


def test_mime_type_picks_the_sample(number: SandboxServer) -> None:
    png = number.add_media(PHONE, "image", mime_type="image/png")
    assert filetype.guess_mime(number.media_bytes(png.media_id)) == "image/png"
    assert png.mime_type == "image/png"


def test_signed_url_expires(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image", size=10_000)
    first = http.get(media.url, headers=AUTH)
    assert first.status_code == 200 and first.content == number.media_bytes(media.media_id)
    number.advance_clock(299)
    assert http.get(media.url, headers=AUTH).status_code == 200
    number.advance_clock(2)
    assert http.get(media.url, headers=AUTH).status_code == 404
    assert http.get(number.signed_url(media.media_id), headers=AUTH).status_code == 200


def test_bad_signature_and_missing_bearer(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image")
    tampered = media.url.replace("hash=", "hash=x")
    assert http.get(tampered, headers=AUTH).status_code == 403
    assert http.get(media.url).status_code == 401


def test_error_throttle_blocks_then_frees(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image")
    for _ in range(19):
        assert http.get("/v21.0/123", headers=AUTH).status_code == 404
    assert http.get(f"/v21.0/{media.media_id}", headers=AUTH).status_code == 200
    assert http.get("/v21.0/123", headers=AUTH).status_code == 404  # the 20th error
    blocked = http.get(f"/v21.0/{media.media_id}", headers=AUTH)
    assert blocked.status_code == 429
    assert 1700 < int(blocked.headers["Retry-After"]) <= 1801
    assert http.get(media.url, headers=AUTH).status_code == 429  # downloads too
    assert number.max_errors_in_window(PHONE) == 20
    assert len(number.errors_served(PHONE)) == 22
    number.advance_clock(1801)
    assert http.get(f"/v21.0/{media.media_id}", headers=AUTH).status_code == 200


def test_360dialog_blocks_lookups_after_five_failures_and_only_lookups(
    sandbox: SandboxServer, http: httpx.Client
) -> None:
    d360 = {"D360-API-KEY": KEY}
    sandbox.add_number(PHONE, KEY, "360dialog")
    media = sandbox.add_media(PHONE, "image")
    path = json.loads(http.get(f"/d360/{media.media_id}", headers=d360).text)["url"]
    download = "/d360" + path.removeprefix("https://lookaside.fbsbx.com")
    for _ in range(4):
        assert http.get("/d360/123", headers=d360).status_code == 404
    assert http.get(f"/d360/{media.media_id}", headers=d360).status_code == 200
    assert http.get("/d360/123", headers=d360).status_code == 404  # the 5th failed lookup
    blocked = http.get(f"/d360/{media.media_id}", headers=d360)
    assert blocked.status_code == 429
    assert 3500 < int(blocked.headers["Retry-After"]) <= 3601
    # Far below the 20-error rule: downloads still work.
    assert http.get(download, headers=d360).status_code == 200
    sandbox.advance_clock(3601)
    assert http.get(f"/d360/{media.media_id}", headers=d360).status_code == 200


def test_errors_outside_the_window_do_not_add_up(number: SandboxServer, http: httpx.Client) -> None:
    for _ in range(15):
        http.get("/v21.0/123", headers=AUTH)
    number.advance_clock(3601)
    for _ in range(15):
        http.get("/v21.0/123", headers=AUTH)
    assert number.max_errors_in_window(PHONE) == 15
    assert http.get("/v21.0/123", headers=AUTH).status_code == 404  # not blocked


def test_status_sequence_then_normal(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image")
    number.set_faults(media.media_id, lookup_statuses=[500, 503, 200], download_statuses=[429])
    statuses = [http.get(f"/v21.0/{media.media_id}", headers=AUTH).status_code for _ in range(4)]
    assert statuses == [500, 503, 200, 200]
    assert [http.get(media.url, headers=AUTH).status_code for _ in range(2)] == [429, 200]
    assert number.requests("graph_lookup", media.media_id) == 4
    assert number.stats()["errors"] == {PHONE: 3}


def test_global_faults_apply_to_other_media(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image")
    number.set_faults(html_200=True)
    response = http.get(media.url, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


def test_corrupt_flips_one_byte_and_keeps_the_stated_sha(
    number: SandboxServer, http: httpx.Client
) -> None:
    media = number.add_media(PHONE, "video", size=200_000)
    number.set_faults(media.media_id, corrupt=True)
    served = http.get(media.url, headers=AUTH).content
    original = number.media_bytes(media.media_id)
    assert len(served) == len(original)
    assert sum(a != b for a, b in zip(served, original, strict=True)) == 1
    lookup = http.get(f"/v21.0/{media.media_id}", headers=AUTH).json()
    assert lookup["sha256"] == media.sha256 == hashlib.sha256(original).hexdigest()


def test_gzip_transfer_and_escaped_d360_lookup(sandbox: SandboxServer, http: httpx.Client) -> None:
    sandbox.add_number(PHONE, KEY, "360dialog")
    media = sandbox.add_media(PHONE, "sticker", size=30_000)
    sandbox.set_faults(media.media_id, gzip=True)
    response = http.get("/d360/" + media.media_id, headers={"D360-API-KEY": KEY})
    assert '"https:\\/\\/lookaside.fbsbx.com\\/whatsapp_business' in response.text
    body = json.loads(response.text)
    assert body["file_size"] == "30000"
    path = body["url"].removeprefix("https://lookaside.fbsbx.com")
    download = http.get("/d360" + path, headers={"D360-API-KEY": KEY})
    assert download.headers["content-encoding"] == "gzip"
    assert download.content == sandbox.media_bytes(media.media_id)


def test_redirect_hops(number: SandboxServer, http: httpx.Client) -> None:
    media = number.add_media(PHONE, "image")
    number.set_faults(media.media_id, redirects=2, redirect_status=302)
    first = http.get(media.url, headers=AUTH)
    assert first.status_code == 302
    second = http.get(first.headers["location"], headers=AUTH)
    assert second.status_code == 302
    assert http.get(second.headers["location"], headers=AUTH).status_code == 200


def test_http_control_api(sandbox: SandboxServer, http: httpx.Client) -> None:
    assert http.post(
        "/_sandbox/numbers", json={"phone_number_id": PHONE, "api_key": KEY}
    ).is_success
    created = http.post(
        "/_sandbox/media", json={"phone_number_id": PHONE, "media_type": "audio", "size": 40_000}
    ).json()
    assert created["file_size"] == 40_000 and created["mime_type"].startswith("audio/ogg")
    data = http.get(created["url"], headers=AUTH).content
    assert hashlib.sha256(data).hexdigest() == created["sha256"]
    assert filetype.guess_mime(data) == "audio/ogg"
    fault = http.post("/_sandbox/faults", json={"media_id": created["media_id"], "nope": 1})
    assert fault.status_code == 400
    assert http.post(
        "/_sandbox/faults", json={"media_id": created["media_id"], "download_statuses": [500]}
    ).is_success
    assert http.get(created["url"], headers=AUTH).status_code == 500
    stats = http.get("/_sandbox/stats").json()
    assert stats["requests"]["cdn_download"][created["media_id"]] == 2
    assert stats["errors"] == {PHONE: 1}
    assert http.post("/_sandbox/reset").is_success
    assert http.get("/_sandbox/stats").json()["media"] == 0
    unknown = http.post("/_sandbox/media", json={"phone_number_id": "x", "media_type": "image"})
    assert unknown.status_code == 400


def test_payloads_parse_and_sign(number: SandboxServer) -> None:
    items = [number.add_media(PHONE, kind) for kind in payloads.MEDIA_TYPES]
    messages = [
        payloads.message_for(m, sha256_format="base64" if i % 2 else "hex")
        for i, m in enumerate(items)
    ]
    body = payloads.encode(
        payloads.webhook(
            PHONE,
            messages=[*messages, payloads.text_message("hi"), payloads.error_message("video")],
            statuses=[payloads.status("wamid.X")],
        ),
        escape_slashes=True,
    )
    assert b"\\/" in body
    parsed = parse_body(body)
    media = [e for e in parsed.media if e.fault is None]
    assert [e.media_type for e in media] == list(payloads.MEDIA_TYPES)
    assert [e.sha256 for e in media] == [m.sha256 for m in items]
    assert [e.url for e in media] == [m.url for m in items]
    faults = [e for e in parsed.media if e.fault is not None]
    assert len(faults) == 1 and faults[0].fault is not None
    assert faults[0].fault.reason == "too_large"
    signature = payloads.sign(body, "app-secret")
    expected = hmac.new(b"app-secret", body, hashlib.sha256).hexdigest()
    assert signature == "sha256=" + expected


def test_one_key_may_serve_several_numbers(sandbox: SandboxServer, http: httpx.Client) -> None:
    # A Meta system-user token reaches every number of its business: two instances added
    # with the same key both download their own media.
    sandbox.add_number("40001", KEY)
    sandbox.add_number("40002", KEY)
    for phone in ("40001", "40002"):
        media = sandbox.add_media(phone, "image", size=5_000)
        assert http.get(f"/v21.0/{media.media_id}", headers=AUTH).status_code == 200
        download = http.get(media.url, headers=AUTH)
        assert download.status_code == 200
        assert download.content == sandbox.media_bytes(media.media_id)
    assert http.get("/v21.0/123", headers={"Authorization": "Bearer other"}).status_code == 401


# --- what the service accepts of the sandbox (issue 14: 1b, 5) -------------------------------


def test_every_url_the_sandbox_hands_out_is_in_the_accepted_cdn_form(
    sandbox: SandboxServer, make_settings: Any
) -> None:
    """Webhook URLs (from /_sandbox/media), lookup answers and redirect hops all have the
    shape the service's clients fetch with a credential; otherwise the demo and the tests
    would resolve every item instead of downloading the webhook's URL."""
    sandbox.add_number("50001", "cloud-key", "cloud")
    sandbox.add_number("50002", "d360-key", "360dialog")
    settings = make_settings(
        graph_url=sandbox.graph_url, d360_url=sandbox.d360_url, media_hosts=sandbox.media_hosts
    )
    with Egress(settings) as egress:
        for phone, provider, key in (
            ("50001", Provider.CLOUD, "cloud-key"),
            ("50002", Provider.D360, "d360-key"),
        ):
            client = client_for(Credentials(provider, phone, key), settings, egress)
            media = sandbox.add_media(phone, "image", size=20_000)
            assert is_attachment_url(media.url)  # the parser keeps it
            assert client.is_cdn_url(client.download_url(media.url))
            location = client.resolve(media.media_id)
            assert client.is_cdn_url(location.url)
            sandbox.set_faults(media.media_id, redirects=2)
            with client.download(media.url, max_bytes=1_000_000) as chunks:
                assert b"".join(chunks) == sandbox.media_bytes(media.media_id)
    # No download was refused for want of the credential, on any hop.
    assert all(seen.had_credentials for seen in sandbox.seen())


def test_the_sandbox_names_its_address_and_port_for_the_allowlist() -> None:
    assert media_hosts_for("http://127.0.0.1:8090") == ["127.0.0.1:8090"]
    assert media_hosts_for("http://localhost:8091") == ["localhost:8091", "127.0.0.1:8091"]
    assert media_hosts_for("http://[::1]:8092") == ["[::1]:8092"]
    with start_sandbox(port=0) as server:
        port = server.base_url.rsplit(":", 1)[1]
        assert server.media_hosts == [f"127.0.0.1:{port}"]


def test_make_run_allows_exactly_the_sandbox_s_address_and_port() -> None:
    # An entry without a port means 80/443 only; `make run`'s bare 127.0.0.1 once let a
    # webhook URL reach any local port (Redis on 6379 included).
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    (line,) = [x for x in makefile.splitlines() if "export INGEST_MEDIA_HOSTS" in x]
    assert line.split("?=", 1)[1].strip() == "127.0.0.1:$(SANDBOX_PORT)"


def test_ingest_sandbox_prints_its_address_and_port(tmp_path: Path) -> None:
    # `ingest sandbox` prints the settings for a service; its allowlist entry must carry
    # the port. Read from the command's first lines, then the server is stopped.
    with subprocess.Popen(
        [str(Path(sys.executable).parent / "ingest"), "sandbox", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    ) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline().strip() for _ in range(3)]
        finally:
            process.terminate()
            process.wait(timeout=10)
    port = lines[0].rsplit(":", 1)[1].split("/", 1)[0]
    assert lines[2] == f"INGEST_MEDIA_HOSTS=127.0.0.1:{port}"
