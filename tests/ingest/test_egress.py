"""Outbound HTTP policy: allowlist, address checks, redirects, credentials, decoded-size cap."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from werkzeug.serving import make_server

from ingest.egress import Credential, Egress, HostPolicy, Origin
from ingest.providers import DisallowedHost, ProviderUnavailable, TooLarge
from sandbox.server import SandboxServer

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


@contextmanager
def wsgi_server(app: WsgiApp) -> Iterator[str]:
    """A throwaway HTTP server on a free port: for answers the sandbox never gives."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def fixed(status: str, headers: list[tuple[str, str]], chunks: list[bytes]) -> WsgiApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response(status, headers)
        return iter(chunks)

    return app


def secret_free(exc: BaseException) -> None:
    text = str(exc)
    for fragment in ("http://", "https://", "?", "mid=", "hash=", "secret-key"):
        assert fragment not in text, text


@pytest.fixture
def egress(sandbox_settings: Any) -> Iterator[Egress]:
    with Egress(sandbox_settings) as built:
        yield built


def cdn_credential(server: SandboxServer, key: str) -> Credential:
    return Credential("Authorization", f"Bearer {key}", frozenset({Origin.of(server.base_url)}))


# --- allowlist and addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("lookaside.fbsbx.com", True),
        ("LOOKASIDE.fbsbx.com", True),
        ("evil-lookaside.fbsbx.com", False),
        ("cdn.example.net", True),
        ("deep.cdn.example.net", True),
        ("example.net", False),
        ("fbsbx.com", False),
    ],
)
def test_name_allowlist_is_exact_or_dot_suffix(host: str, allowed: bool) -> None:
    policy = HostPolicy.from_hosts(["lookaside.fbsbx.com", ".example.net"])
    assert policy.name_allowed(host) is allowed


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_unless_listed(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not HostPolicy.from_hosts(["media.example"]).address_allowed(ip)
    assert HostPolicy.from_hosts(["media.example", address]).address_allowed(ip)


def test_public_addresses_pass() -> None:
    policy = HostPolicy.from_hosts(["media.example"])
    assert policy.address_allowed(ipaddress.ip_address("157.240.1.1"))
    assert policy.address_allowed(ipaddress.ip_address("2a03:2880:f003::1"))


def test_host_off_the_allowlist_is_refused_before_any_connection(egress: Egress) -> None:
    with (
        pytest.raises(DisallowedHost) as caught,
        egress.get("https://evil.example/steal?hash=secret-key", endpoint="download"),
    ):
        pass
    assert caught.value.counts_against_budget is False
    assert "evil.example" in str(caught.value)
    secret_free(caught.value)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "not a url"])
def test_only_http_urls_are_fetched(egress: Egress, url: str) -> None:
    with pytest.raises(DisallowedHost), egress.get(url, endpoint="download"):
        pass


def test_allowlisted_name_resolving_to_private_address_is_refused(
    sandbox: SandboxServer, make_settings: Any
) -> None:
    settings = make_settings(media_hosts=["media.example"])
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    port = sandbox.base_url.rsplit(":", 1)[1]
    with (
        Egress(settings, resolver=resolver) as egress,
        pytest.raises(DisallowedHost) as caught,
        egress.get(f"http://media.example:{port}/_sandbox/stats", endpoint="lookup"),
    ):
        pass
    assert resolved == ["media.example"]  # the check runs at connection time, on the answer
    assert caught.value.counts_against_budget is False
    secret_free(caught.value)


def test_private_address_listed_literally_is_allowed_and_is_where_we_connect(
    sandbox: SandboxServer, make_settings: Any
) -> None:
    settings = make_settings(media_hosts=["media.example", "127.0.0.1"])
    port = sandbox.base_url.rsplit(":", 1)[1]
    # First answer refused, second allowed: we connect to the checked address, not the name.
    url = f"http://media.example:{port}/_sandbox/stats"
    with (
        Egress(settings, resolver=lambda host, p: ["10.9.9.9", "127.0.0.1"]) as egress,
        egress.get(url, endpoint="lookup") as r,
    ):
        assert r.status_code == 200
        assert b"requests" in r.read(1_000_000)


def test_unresolvable_name_is_unavailable_not_counted(make_settings: Any) -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror("no such name")

    with (
        Egress(make_settings(media_hosts=["media.example"]), resolver=resolver) as egress,
        pytest.raises(ProviderUnavailable) as caught,
        egress.get("http://media.example/x?hash=secret-key", endpoint="lookup"),
    ):
        pass
    assert caught.value.counts_against_budget is False
    secret_free(caught.value)


def test_connection_refused_is_unavailable_not_counted(egress: Egress) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with (
            pytest.raises(ProviderUnavailable) as caught,
            egress.get(f"http://127.0.0.1:{port}/x?hash=secret-key", endpoint="lookup"),
        ):
            pass
    assert caught.value.retryable and caught.value.counts_against_budget is False
    secret_free(caught.value)


def test_read_timeout_is_unavailable_and_counted(make_settings: Any) -> None:
    release = threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        release.wait(5)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    settings = make_settings(http_timeout_seconds=0.2)
    with wsgi_server(slow) as base, Egress(settings) as egress:
        try:
            with (
                pytest.raises(ProviderUnavailable) as caught,
                egress.get(base + "/x?hash=secret-key", endpoint="lookup"),
            ):
                pass
        finally:
            release.set()
    assert caught.value.counts_against_budget is True
    secret_free(caught.value)


# --- redirects and credentials -----------------------------------------------------------


def _media(sandbox: SandboxServer, size: int = 50_000) -> Any:
    sandbox.add_number("1001", "cloud-key")
    return sandbox.add_media("1001", "image", size=size)


def test_redirects_are_followed_hop_by_hop(egress: Egress, sandbox: SandboxServer) -> None:
    media = _media(sandbox)
    sandbox.set_faults(media.media_id, redirects=4, redirect_status=308)
    with egress.get(
        media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")
    ) as response:
        data = response.read(1_000_000)
    assert data == sandbox.media_bytes(media.media_id)
    assert sandbox.requests("cdn_download", media.media_id) == 5


def test_too_many_redirects_stop(egress: Egress, sandbox: SandboxServer) -> None:
    media = _media(sandbox)
    sandbox.set_faults(media.media_id, redirects=6, redirect_status=302)
    with (
        pytest.raises(ProviderUnavailable) as caught,
        egress.get(media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")),
    ):
        pass
    assert sandbox.requests("cdn_download", media.media_id) == 6
    secret_free(caught.value)


def test_redirect_to_a_host_off_the_allowlist_is_refused(
    egress: Egress, sandbox: SandboxServer
) -> None:
    media = _media(sandbox)
    sandbox.set_faults(media.media_id, redirects=2, redirect_host="evil.example")
    with (
        pytest.raises(DisallowedHost) as caught,
        egress.get(media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")),
    ):
        pass
    assert "evil.example" in str(caught.value)
    assert sandbox.requests("cdn_download", media.media_id) == 2  # never reached a third
    secret_free(caught.value)


def test_credentials_are_dropped_on_a_hop_to_another_host(
    egress: Egress, sandbox: SandboxServer
) -> None:
    media = _media(sandbox)
    sandbox.set_faults(media.media_id, redirects=2, redirect_host="localhost")
    with egress.get(
        media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")
    ) as response:
        assert response.status_code == 401  # the CDN wanted the bearer we did not send
    seen = [(s.host.split(":")[0], s.had_credentials) for s in sandbox.seen()]
    assert seen == [("127.0.0.1", True), ("127.0.0.1", True), ("localhost", False)]


def test_no_cookie_is_kept_or_sent_so_no_request_carries_another_s_state(
    make_settings: Any,
) -> None:
    # One egress serves every instance of the process: a cookie the provider set while
    # answering one instance must not ride along on the next instance's request.
    cookies_seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        cookies_seen.append(environ.get("HTTP_COOKIE"))
        start_response(
            "200 OK",
            [("Set-Cookie", "session=instance-a; Path=/"), ("Content-Length", "2")],
        )
        return [b"ok"]

    with wsgi_server(app) as base, Egress(make_settings()) as egress:
        for _ in range(2):
            with egress.get(base + "/media", endpoint="download") as response:
                assert response.status_code == 200
    assert cookies_seen == [None, None]


# --- body size ---------------------------------------------------------------------------


def test_gzip_bomb_is_cut_at_the_decoded_cap(make_settings: Any) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = compressor.compress(bytes(64 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < 100_000
    app = fixed(
        "200 OK", [("Content-Encoding", "gzip"), ("Content-Length", str(len(bomb)))], [bomb]
    )
    received = 0
    with (
        wsgi_server(app) as base,
        Egress(make_settings()) as egress,
        egress.get(base + "/bomb", endpoint="download") as response,
        pytest.raises(TooLarge) as caught,
    ):
        for piece in response.iter_bytes(1_000_000):
            received += len(piece)
            assert len(piece) <= 64 * 1024  # inflated in bounded steps
    assert received <= 1_000_000
    assert caught.value.counts_against_budget is False


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_bodies_are_decoded(make_settings: Any, wbits: int) -> None:
    payload = b"sandbox" * 10_000
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = compressor.compress(payload) + compressor.flush()
    app = fixed("200 OK", [("Content-Encoding", "deflate")], [body])
    with (
        wsgi_server(app) as base,
        Egress(make_settings()) as egress,
        egress.get(base + "/d", endpoint="download") as response,
    ):
        assert response.read(len(payload)) == payload


def test_content_length_over_the_cap_is_refused_before_reading(make_settings: Any) -> None:
    sent: list[int] = []

    def big(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Length", str(50 * 1024 * 1024))])

        def body() -> Iterator[bytes]:
            for _ in range(800):
                sent.append(1)
                yield bytes(64 * 1024)

        return body()

    with (
        wsgi_server(big) as base,
        Egress(make_settings()) as egress,
        egress.get(base + "/big", endpoint="download") as response,
        pytest.raises(TooLarge),
    ):
        next(response.iter_bytes(10 * 1024 * 1024))
    assert len(sent) < 800  # the server was cut off, not read to the end


def test_cap_counts_gzip_decoded_bytes_exactly(egress: Egress, sandbox: SandboxServer) -> None:
    media = _media(sandbox, size=300_000)
    sandbox.set_faults(media.media_id, gzip=True)
    credential = cdn_credential(sandbox, "cloud-key")
    with egress.get(media.url, endpoint="download", credential=credential) as response:
        assert response.headers["content-encoding"] == "gzip"
        assert response.read(300_000) == sandbox.media_bytes(media.media_id)
    sandbox.set_faults(media.media_id, gzip=True)
    with (
        egress.get(media.url, endpoint="download", credential=credential) as response,
        pytest.raises(TooLarge),
    ):
        response.read(299_999)


def test_truncated_body_is_unavailable(egress: Egress, sandbox: SandboxServer) -> None:
    media = _media(sandbox, size=300_000)
    sandbox.set_faults(media.media_id, truncate=100_000)
    with (
        egress.get(
            media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")
        ) as response,
        pytest.raises(ProviderUnavailable) as caught,
    ):
        response.read(1_000_000)
    assert caught.value.counts_against_budget is True
    secret_free(caught.value)


def test_egress_is_shared_by_threads(egress: Egress, sandbox: SandboxServer) -> None:
    media = _media(sandbox, size=100_000)
    expected = sandbox.media_bytes(media.media_id)
    credential = cdn_credential(sandbox, "cloud-key")
    results: list[bool] = []

    def fetch() -> None:
        for _ in range(3):
            with egress.get(media.url, endpoint="download", credential=credential) as r:
                results.append(r.read(1_000_000) == expected)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    assert results == [True] * 24
