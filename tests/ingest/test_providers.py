"""Cloud API and 360dialog clients against the sandbox provider."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from ingest.egress import Egress, EgressResponse
from ingest.models import Provider
from ingest.providers import (
    CloudApiClient,
    Credentials,
    D360Client,
    MediaNotFound,
    ProviderAuthError,
    ProviderClient,
    ProviderError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TooLarge,
    UrlRejected,
    _decode_lookup,
    _file_size,
    _raise_unless_ok,
    client_for,
    rewrite_for_d360,
)
from sandbox.provider import SandboxMedia
from sandbox.server import SandboxServer, media_hosts_for
from tests.plugins.wsgi import wsgi_server

PHONE = {Provider.CLOUD: "20001", Provider.D360: "30001"}
KEY = {Provider.CLOUD: "cloud-secret-key", Provider.D360: "d360-secret-key"}
BOTH = pytest.mark.parametrize("provider", [Provider.CLOUD, Provider.D360], ids=str)


@pytest.fixture
def egress(sandbox_settings: Any) -> Iterator[Egress]:
    with Egress(sandbox_settings) as built:
        yield built


@pytest.fixture
def numbers(sandbox: SandboxServer) -> SandboxServer:
    sandbox.add_number(PHONE[Provider.CLOUD], KEY[Provider.CLOUD], "cloud")
    sandbox.add_number(PHONE[Provider.D360], KEY[Provider.D360], "360dialog")
    return sandbox


def client(provider: Provider, settings: Any, egress: Egress, key: str | None = None) -> Any:
    credentials = Credentials(provider, PHONE[provider], key or KEY[provider])
    return client_for(credentials, settings, egress)


def download(c: ProviderClient, url: str, max_bytes: int = 10_000_000) -> bytes:
    with c.download(url, max_bytes=max_bytes) as chunks:
        return b"".join(chunks)


def add(sandbox: SandboxServer, provider: Provider, **kwargs: Any) -> SandboxMedia:
    kwargs.setdefault("size", 120_000)
    return sandbox.add_media(PHONE[provider], kwargs.pop("media_type", "image"), **kwargs)


def assert_secret_free(exc: ProviderError) -> None:
    text = str(exc)
    for secret in ("http://", "https://", "?", "mid=", "hash=", *KEY.values()):
        assert secret not in text, text


def test_client_for_picks_the_provider(sandbox_settings: Any, egress: Egress) -> None:
    assert isinstance(client(Provider.CLOUD, sandbox_settings, egress), CloudApiClient)
    assert isinstance(client(Provider.D360, sandbox_settings, egress), D360Client)
    assert KEY[Provider.CLOUD] not in repr(client(Provider.CLOUD, sandbox_settings, egress))


@BOTH
def test_lookup_then_download(
    provider: Provider, numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, provider, media_type="document", size=250_000)
    c = client(provider, sandbox_settings, egress)
    location = c.resolve(media.media_id)
    assert location.sha256 == media.sha256
    assert location.file_size == 250_000  # int, also from 360dialog's string
    assert location.mime_type == "application/pdf"
    assert "\\" not in location.url
    data = download(c, location.url)
    assert hashlib.sha256(data).hexdigest() == media.sha256
    assert "<redacted>" in repr(location) and "hash=" not in repr(location)


def test_d360_lookup_url_is_rehosted_on_the_360dialog_base(
    numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, Provider.D360)
    location = client(Provider.D360, sandbox_settings, egress).resolve(media.media_id)
    assert location.url.startswith(numbers.d360_url + "/whatsapp_business/attachments/?")
    assert numbers.requests("d360_download") == 0


@pytest.mark.parametrize(
    "faults",
    [
        {"double_escape": True},
        {"lookup_gzip": "header"},
        {"lookup_gzip": "sniff"},
        {"lookup_gzip": "sniff", "double_escape": True},
    ],
)
def test_d360_lookup_quirks(
    faults: dict[str, Any], numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, Provider.D360)
    numbers.set_faults(media.media_id, **faults)
    c = client(Provider.D360, sandbox_settings, egress)
    location = c.resolve(media.media_id)
    assert location.url.startswith(numbers.d360_url + "/whatsapp_business/")
    assert hashlib.sha256(download(c, location.url)).hexdigest() == media.sha256


def test_d360_download_accepts_the_webhook_lookaside_url(
    numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, Provider.D360)
    assert media.url.startswith("https://lookaside.fbsbx.com/")
    escaped = media.url.replace("/", "\\/")
    c = client(Provider.D360, sandbox_settings, egress)
    for url in (media.url, escaped):
        assert hashlib.sha256(download(c, url)).hexdigest() == media.sha256
    assert numbers.requests("d360_download", media.media_id) == 2


def test_rewrite_for_d360() -> None:
    base = "https://waba-v2.360dialog.io"
    url = "https:\\/\\/lookaside.fbsbx.com\\/whatsapp_business\\/attachments\\/?mid=1&ext=2&hash=h"
    expected = "https://waba-v2.360dialog.io/whatsapp_business/attachments/?mid=1&ext=2&hash=h"
    assert rewrite_for_d360(url, base) == expected
    assert rewrite_for_d360(url.replace("\\/", "\\\\/"), base) == expected
    assert rewrite_for_d360(url, "http://127.0.0.1:9/d360").startswith(
        "http://127.0.0.1:9/d360/whatsapp_business/attachments/?mid=1"
    )
    assert rewrite_for_d360("https://other.example/x?y=1", base) == "https://other.example/x?y=1"


def test_cloud_download_of_the_webhook_url(
    numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, Provider.CLOUD, media_type="audio")
    c = client(Provider.CLOUD, sandbox_settings, egress)
    assert hashlib.sha256(download(c, media.url)).hexdigest() == media.sha256
    assert numbers.requests("graph_lookup") == 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ProviderRejected),
        (401, ProviderAuthError),
        (403, ProviderAuthError),
        (404, MediaNotFound),
        (410, ProviderRejected),
        (429, ProviderThrottled),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
    ],
)
@BOTH
def test_lookup_status_mapping(
    provider: Provider,
    status: int,
    error: type[ProviderError],
    numbers: SandboxServer,
    sandbox_settings: Any,
    egress: Egress,
) -> None:
    media = add(numbers, provider)
    numbers.set_faults(media.media_id, lookup_statuses=[status])
    c = client(provider, sandbox_settings, egress)
    with pytest.raises(error) as caught:
        c.resolve(media.media_id)
    exc = caught.value
    assert type(exc) is error
    assert (exc.status, exc.endpoint, exc.counts_against_budget) == (status, "lookup", True)
    assert exc.retryable is (status in (429, 500, 503))
    if status == 429:
        assert exc.retry_after == 60.0
    assert_secret_free(exc)
    assert c.resolve(media.media_id).sha256 == media.sha256  # the sequence is used up


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, ProviderRejected),
        (401, UrlRejected),
        (403, UrlRejected),
        (404, UrlRejected),
        (410, UrlRejected),
        (429, ProviderThrottled),
        (502, ProviderUnavailable),
    ],
)
@BOTH
def test_download_status_mapping(
    provider: Provider,
    status: int,
    error: type[ProviderError],
    numbers: SandboxServer,
    sandbox_settings: Any,
    egress: Egress,
) -> None:
    media = add(numbers, provider)
    numbers.set_faults(media.media_id, download_statuses=[status])
    c = client(provider, sandbox_settings, egress)
    with pytest.raises(error) as caught:
        download(c, media.url)
    assert type(caught.value) is error
    assert (caught.value.status, caught.value.endpoint) == (status, "download")
    assert_secret_free(caught.value)


@BOTH
def test_wrong_key_is_an_auth_error(
    provider: Provider, numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, provider)
    c = client(provider, sandbox_settings, egress, key="not-the-key")
    with pytest.raises(ProviderAuthError) as caught:
        c.resolve(media.media_id)
    assert_secret_free(caught.value)


@BOTH
def test_unknown_media_is_not_found(
    provider: Provider, numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    with pytest.raises(MediaNotFound):
        client(provider, sandbox_settings, egress).resolve("999999")


@BOTH
def test_expired_url_is_rejected_and_a_new_lookup_works(
    provider: Provider, numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, provider)
    numbers.advance_clock(301)
    c = client(provider, sandbox_settings, egress)
    with pytest.raises(UrlRejected) as caught:
        download(c, media.url)
    assert_secret_free(caught.value)
    fresh = c.resolve(media.media_id)
    assert hashlib.sha256(download(c, fresh.url)).hexdigest() == media.sha256


@BOTH
def test_download_over_the_cap_is_too_large(
    provider: Provider, numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, provider, size=200_000)
    c = client(provider, sandbox_settings, egress)
    with pytest.raises(TooLarge) as caught:
        download(c, media.url, max_bytes=199_999)
    assert caught.value.counts_against_budget is False
    assert_secret_free(caught.value)
    numbers.set_faults(media.media_id, gzip=True)
    with pytest.raises(TooLarge):
        download(c, media.url, max_bytes=199_999)
    assert len(download(c, media.url, max_bytes=200_000)) == 200_000


Seen = list[tuple[str, str | None]]


@contextmanager
def fake_graph(answer: Callable[[str], tuple[str, list[tuple[str, str]], bytes]]) -> Iterator[Any]:
    """A Graph stand-in on a free port: ``answer(path)`` gives status, headers and body. Yields
    (base URL, settings pointed at it, the requests seen as (path?query, Authorization))."""
    seen: Seen = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        query = environ["QUERY_STRING"]
        seen.append(
            (
                environ["PATH_INFO"] + ("?" + query if query else ""),
                environ.get("HTTP_AUTHORIZATION"),
            )
        )
        status, headers, body = answer(environ["PATH_INFO"])
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    with wsgi_server(app) as base:
        yield base, seen


def graph_client(base: str, make_settings: Any, egress_out: list[Egress]) -> CloudApiClient:
    settings = make_settings(graph_url=base + "/v21.0", media_hosts=media_hosts_for(base))
    egress = Egress(settings)
    egress_out.append(egress)
    credentials = Credentials(Provider.CLOUD, PHONE[Provider.CLOUD], KEY[Provider.CLOUD])
    return CloudApiClient(credentials, settings, egress)


@pytest.fixture
def egresses() -> Iterator[list[Egress]]:
    built: list[Egress] = []
    yield built
    for egress in built:
        egress.close()


def test_lookup_answer_without_url_is_unavailable_and_not_counted(
    make_settings: Any, egresses: list[Egress]
) -> None:
    def answer(path: str) -> tuple[str, list[tuple[str, str]], bytes]:
        return "200 OK", [("Content-Type", "application/json")], b'{"id": "123"}'

    with fake_graph(answer) as (base, seen), pytest.raises(ProviderUnavailable) as caught:
        graph_client(base, make_settings, egresses).resolve("123")
    assert caught.value.counts_against_budget is False
    assert seen == [("/v21.0/123", f"Bearer {KEY[Provider.CLOUD]}")]


# --- where the credential goes (issue 14: 1b, 1c) -----------------------------------------


@pytest.mark.parametrize(
    "media_id",
    ["", "..", "../me", "1/2", "/123", "1?fields=x", "%2e%2e", "123#x", "abc", " 123", "1.5"],
)
@BOTH
def test_a_lookup_never_builds_a_url_path_from_an_unchecked_media_id(
    provider: Provider,
    media_id: str,
    numbers: SandboxServer,
    sandbox_settings: Any,
    egress: Egress,
) -> None:
    with pytest.raises(ProviderRejected) as caught:
        client(provider, sandbox_settings, egress).resolve(media_id)
    assert caught.value.counts_against_budget is False
    assert numbers.seen() == []  # no request at all, so no credential anywhere


@BOTH
def test_a_download_url_of_another_shape_is_not_fetched(
    provider: Provider,
    numbers: SandboxServer,
    sandbox_settings: Any,
    egress: Egress,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A webhook URL on the provider's own host but another path: with the credential, the
    # Graph lookup of another media id (or any other API endpoint) would be fetched and
    # archived as "media". Refused before any request; the pipeline resolves the media id.
    media = add(numbers, provider)
    c = client(provider, sandbox_settings, egress)
    query = media.url.split("?", 1)[1]
    urls = [
        f"{numbers.graph_url}/{media.media_id}",
        f"{numbers.d360_url}/{media.media_id}",
        f"{numbers.base_url}/_sandbox/stats",
        f"{numbers.base_url}/whatsapp_business/attachments/?ext=1&hash=h",
        f"{numbers.base_url}/whatsapp_business/attachments/x?{query}",
        f"{numbers.d360_url}/whatsapp_business/attachments/../../v21.0/{media.media_id}",
        f"https://lookaside.fbsbx.com/other/?{query}",
        f"http://127.0.0.1:6379/whatsapp_business/attachments/?{query}",
    ]
    for url in urls:
        with caplog.at_level(logging.WARNING), pytest.raises(UrlRejected) as caught:
            download(c, url)
        assert caught.value.counts_against_budget is False
        assert caught.value.status is None
        assert_secret_free(caught.value)
    assert numbers.seen() == []
    assert "not a CDN attachment URL" in caplog.text
    assert "_sandbox" not in caplog.text and media.media_id not in caplog.text


@pytest.mark.parametrize(
    ("provider", "url", "accepted"),
    [
        (Provider.CLOUD, "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1", True),
        (Provider.CLOUD, "{root}/whatsapp_business/attachments/?mid=1&ext=2&hash=h", True),
        (Provider.CLOUD, "{root}/d360/whatsapp_business/attachments/?mid=1", False),
        (
            Provider.CLOUD,
            "https://waba-v2.360dialog.io/whatsapp_business/attachments/?mid=1",
            False,
        ),
        (Provider.CLOUD, "http://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1", False),
        (Provider.D360, "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1", True),
        (Provider.D360, "{root}/d360/whatsapp_business/attachments/?mid=1&ext=2&hash=h", True),
        (Provider.D360, "{root}/whatsapp_business/attachments/?mid=1", False),
        (Provider.D360, "https://lookaside.fbsbx.com/whatsapp_business/other/?mid=1", False),
    ],
)
def test_the_accepted_cdn_forms(
    provider: Provider, url: str, accepted: bool, sandbox_settings: Any, egress: Egress
) -> None:
    c = client(provider, sandbox_settings, egress)
    root = sandbox_settings.graph_url.rsplit("/", 1)[0]
    assert c.is_cdn_url(c.download_url(url.format(root=root))) is accepted


def test_a_lookup_answering_a_url_of_another_shape_is_unusable(
    make_settings: Any, egresses: list[Egress]
) -> None:
    def answer(path: str) -> tuple[str, list[tuple[str, str]], bytes]:
        body = {"url": "http://127.0.0.1:1/v21.0/me?fields=id", "mime_type": "image/jpeg"}
        return "200 OK", [("Content-Type", "application/json")], json.dumps(body).encode()

    with fake_graph(answer) as (base, seen), pytest.raises(ProviderUnavailable) as caught:
        graph_client(base, make_settings, egresses).resolve("123")
    assert caught.value.counts_against_budget is False
    assert_secret_free(caught.value)
    assert len(seen) == 1


def test_the_lookup_credential_is_not_sent_on_a_hop_to_another_path(
    make_settings: Any, egresses: list[Egress]
) -> None:
    def answer(path: str) -> tuple[str, list[tuple[str, str]], bytes]:
        if path == "/v21.0/123":
            return "302 Found", [("Location", "/v21.0/me?fields=id")], b""
        return "200 OK", [("Content-Type", "application/json")], b'{"id": "me"}'

    with fake_graph(answer) as (base, seen), pytest.raises(ProviderUnavailable):
        graph_client(base, make_settings, egresses).resolve("123")
    assert seen == [
        ("/v21.0/123", f"Bearer {KEY[Provider.CLOUD]}"),
        ("/v21.0/me?fields=id", None),
    ]


def test_size_stated_by_lookup_is_reported(
    numbers: SandboxServer, sandbox_settings: Any, egress: Egress
) -> None:
    media = add(numbers, Provider.D360)
    numbers.set_faults(media.media_id, size_delta=-10)
    location = client(Provider.D360, sandbox_settings, egress).resolve(media.media_id)
    assert location.file_size == media.file_size - 10


@BOTH
def test_no_log_record_carries_a_signed_url_or_a_key(
    provider: Provider,
    numbers: SandboxServer,
    sandbox_settings: Any,
    egress: Egress,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Everything at DEBUG, from every logger (httpx and httpcore log request lines).
    caplog.set_level(logging.DEBUG)
    media = add(numbers, provider)
    c = client(provider, sandbox_settings, egress)
    location = c.resolve(media.media_id)
    assert download(c, location.url) == numbers.media_bytes(media.media_id)
    # A second URL, as the webhook carries it: the Cloud CDN's, or lookaside for 360dialog.
    webhook_url = numbers.signed_url(media.media_id)
    if provider is Provider.D360:
        webhook_url = webhook_url.replace(numbers.base_url, "https://lookaside.fbsbx.com")
    assert download(c, webhook_url)

    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (location.url, location.url.split("?", 1)[-1], KEY[provider]):
        assert secret not in logged
    assert "hash=" not in logged


def _answer(status: int, headers: dict[str, str]) -> EgressResponse:
    return EgressResponse(
        status_code=status,
        headers=httpx.Headers(headers),
        host="graph.example",
        endpoint="lookup",
        _response=httpx.Response(status),
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("60", 60.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
        ("1e12", 1e12),  # taken as said: the retry policy caps it (test_retry_policy)
        ("inf", None),
        ("-inf", None),
        ("Infinity", None),
        ("nan", None),
        ("-5", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("", None),
    ],
)
def test_retry_after_is_a_finite_wait_or_none(header: str, expected: float | None) -> None:
    with pytest.raises(ProviderThrottled) as caught:
        _raise_unless_ok(_answer(429, {"Retry-After": header}), "lookup")
    assert caught.value.retry_after == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (250_000, 250_000),
        ("250000", 250_000),
        (" 42 ", 42),
        ("0", 0),
        (-1, None),
        (True, None),
        ("²", None),
        ("1²", None),
        ("١٢٣", None),  # Arabic-Indic digits: decimal, but not ASCII
        ("12.5", None),
        ("-3", None),
        ("", None),
        ("9" * 5000, None),  # past int()'s digit limit: must not raise
        (None, None),
        (12.0, None),
    ],
)
def test_a_stated_file_size_is_plain_ascii_decimal(value: object, expected: int | None) -> None:
    assert _file_size(value) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"url": "https://x/y", "file_size": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not utf-8",
    ],
)
def test_a_lookup_body_python_cannot_parse_is_unavailable_not_a_crash(body: bytes) -> None:
    with pytest.raises(ProviderUnavailable):
        _decode_lookup(body, "graph.example")
