"""Outbound HTTP policy: allowlist, address checks, redirects, credentials, decoded-size cap."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.egress import Egress
from ingest.egress_guard import (
    Credential,
    CredentialScope,
    HostPolicy,
    Origin,
    RefusedAddress,
    _GuardedBackend,
)
from ingest.providers import DisallowedHost, ProviderUnavailable, TooLarge
from ingest.settings import Settings
from sandbox.server import SandboxServer, media_hosts_for
from tests.plugins.wsgi import WsgiApp, wsgi_server


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


ATTACHMENTS = "/whatsapp_business/attachments/"


def cdn_credential(server: SandboxServer, key: str) -> Credential:
    scope = CredentialScope(Origin.of(server.base_url), ATTACHMENTS, "mid")
    return Credential("Authorization", f"Bearer {key}", frozenset({scope}))


def local(make_settings: Any, base: str, **overrides: Any) -> Any:
    """Settings that allow the throwaway server at ``base`` (its address and port)."""
    return make_settings(media_hosts=media_hosts_for(base), **overrides)


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
    assert policy.url_allowed(Origin("https", host.lower(), 443)) is allowed
    assert policy.name_allowed(host, 443) is allowed


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
    assert not HostPolicy.from_hosts(["media.example"]).address_allowed(ip, 443)
    assert HostPolicy.from_hosts(["media.example", address]).address_allowed(ip, 443)
    assert not HostPolicy.from_hosts(["media.example", address]).address_allowed(ip, 6379)
    listed = f"[{address}]:6379" if ":" in address else f"{address}:6379"
    assert HostPolicy.from_hosts([listed]).address_allowed(ip, 6379)
    assert not HostPolicy.from_hosts([listed]).address_allowed(ip, 443)


def test_public_addresses_pass() -> None:
    policy = HostPolicy.from_hosts(["media.example"])
    assert policy.address_allowed(ipaddress.ip_address("157.240.1.1"), 443)
    assert policy.address_allowed(ipaddress.ip_address("2a03:2880:f003::1"), 443)


# --- ports (issue 14: 5) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "origin", "allowed"),
    [
        ("lookaside.fbsbx.com", ("https", "lookaside.fbsbx.com", 443), True),
        ("lookaside.fbsbx.com", ("http", "lookaside.fbsbx.com", 80), True),
        ("lookaside.fbsbx.com", ("https", "lookaside.fbsbx.com", 8443), False),
        ("lookaside.fbsbx.com", ("http", "lookaside.fbsbx.com", 443), False),
        ("127.0.0.1", ("http", "127.0.0.1", 80), True),
        ("127.0.0.1", ("http", "127.0.0.1", 6379), False),
        ("127.0.0.1:8090", ("http", "127.0.0.1", 8090), True),
        ("127.0.0.1:8090", ("http", "127.0.0.1", 8091), False),
        ("127.0.0.1:8090", ("http", "127.0.0.1", 80), False),
        ("[::1]:8090", ("http", "::1", 8090), True),
        ("[::1]:8090", ("http", "::1", 6379), False),
        (".example.net:8443", ("https", "cdn.example.net", 8443), True),
        (".example.net:8443", ("https", "cdn.example.net", 443), False),
        ("localhost:8090", ("http", "localhost", 8090), True),
        ("localhost:8090", ("http", "127.0.0.1", 8090), False),  # a name is not its address
    ],
)
def test_an_entry_allows_its_port_or_else_only_the_scheme_s_default(
    entry: str, origin: tuple[str, str, int], allowed: bool
) -> None:
    assert HostPolicy.from_hosts([entry]).url_allowed(Origin(*origin)) is allowed


def test_make_run_s_old_allowlist_no_longer_reaches_any_local_port(make_settings: Any) -> None:
    # `make run` listed 127.0.0.1,localhost: a webhook URL to any local port was fetched
    # (an HTTP GET reached Redis on 6379). Without a port, an entry means 80/443 only.
    hits: list[str] = []

    def service(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        hits.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    settings = make_settings(media_hosts=["127.0.0.1", "localhost"])
    with wsgi_server(service) as base, Egress(settings) as egress:
        for url in (base + "/", base.replace("127.0.0.1", "localhost") + "/"):
            with pytest.raises(DisallowedHost) as caught, egress.get(url, endpoint="download"):
                pass
            assert "not on the allowlist" in str(caught.value)
    assert hits == []


def test_the_port_is_checked_again_where_the_socket_opens() -> None:
    # The connection backend sees only host and port: an address listed without a port
    # stands for 80 and 443 there, never for another local service.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        backend = _GuardedBackend(HostPolicy.from_hosts(["127.0.0.1"]), lambda h, p: [h])
        with pytest.raises(RefusedAddress):
            backend.connect_tcp("127.0.0.1", port, timeout=2)
        named = _GuardedBackend(HostPolicy.from_hosts(["media.example"]), lambda h, p: [h])
        with pytest.raises(RefusedAddress):
            named.connect_tcp("media.example", port, timeout=2)
        listed = _GuardedBackend(
            HostPolicy.from_hosts([f"127.0.0.1:{port}"]), lambda h, p: ["127.0.0.1"]
        )
        listed.connect_tcp("127.0.0.1", port, timeout=2).close()


def test_media_hosts_are_validated_and_written_one_way() -> None:
    settings = Settings(
        media_hosts=" LOOKASIDE.fbsbx.com. , 127.0.0.1:8090,[::1]:9, ::1 ,.Example.net:8443"
    )
    assert settings.media_hosts == [
        "lookaside.fbsbx.com",
        "127.0.0.1:8090",
        "[::1]:9",
        "[::1]",
        ".example.net:8443",
    ]
    for bad in ("http://127.0.0.1:8090", "127.0.0.1:0", "127.0.0.1:65536", "host:abc", "*.x"):
        with pytest.raises(ValidationError):
            Settings(media_hosts=bad)


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
    port = sandbox.base_url.rsplit(":", 1)[1]
    settings = make_settings(media_hosts=[f"media.example:{port}"])
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

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
    port = sandbox.base_url.rsplit(":", 1)[1]
    settings = make_settings(media_hosts=[f"media.example:{port}", f"127.0.0.1:{port}"])
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


def test_connection_refused_is_unavailable_not_counted(make_settings: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with (
            Egress(make_settings(media_hosts=[f"127.0.0.1:{port}"])) as egress,
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

    with (
        wsgi_server(slow) as base,
        Egress(local(make_settings, base, http_timeout_seconds=0.2)) as egress,
    ):
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
    sandbox: SandboxServer, sandbox_settings: Any
) -> None:
    media = _media(sandbox)
    sandbox.set_faults(media.media_id, redirects=2, redirect_host="localhost")
    hosts = media_hosts_for(sandbox.base_url.replace("127.0.0.1", "localhost"))
    settings = sandbox_settings.model_copy(update={"media_hosts": hosts})
    with (
        Egress(settings) as egress,
        egress.get(
            media.url, endpoint="download", credential=cdn_credential(sandbox, "cloud-key")
        ) as response,
    ):
        assert response.status_code == 401  # the CDN wanted the bearer we did not send
    seen = [(s.host.split(":")[0], s.had_credentials) for s in sandbox.seen()]
    assert seen == [("127.0.0.1", True), ("127.0.0.1", True), ("localhost", False)]


def _recording(seen: list[tuple[str, str | None]], redirect_to: str | None = None) -> WsgiApp:
    """Answers 200 (or a 302 to ``redirect_to`` from the attachment path), recording each
    request's path and query and the Authorization header it carried."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        target = environ["PATH_INFO"] + (
            "?" + environ["QUERY_STRING"] if environ["QUERY_STRING"] else ""
        )
        seen.append((target, environ.get("HTTP_AUTHORIZATION")))
        if redirect_to and environ["PATH_INFO"] == ATTACHMENTS:
            start_response("302 Found", [("Location", redirect_to), ("Content-Length", "0")])
            return [b""]
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    return app


def test_a_credential_goes_only_to_its_exact_path_and_query_form(make_settings: Any) -> None:
    # 1b: the same host's other paths and queries (the Graph API's other endpoints, a
    # sandbox's control routes) never see the provider credential.
    seen: list[tuple[str, str | None]] = []
    with wsgi_server(_recording(seen)) as base, Egress(local(make_settings, base)) as egress:
        scope = CredentialScope(Origin.of(base), ATTACHMENTS, "mid")
        credential = Credential("Authorization", "Bearer k", frozenset({scope}))
        for target in (
            ATTACHMENTS + "?mid=1&ext=2&hash=h",
            "/other?mid=1",
            ATTACHMENTS + "?ext=2",
            ATTACHMENTS + "?mid=1&mid=2",
            ATTACHMENTS + "?mid=",
            "/whatsapp_business/attachments?mid=1",
            ATTACHMENTS + "x?mid=1",
        ):
            with egress.get(base + target, endpoint="download", credential=credential) as r:
                assert r.status_code == 200
        lookup = CredentialScope(Origin.of(base), "/v21.0/123")
        only_lookup = Credential("Authorization", "Bearer k", frozenset({lookup}))
        for target in ("/v21.0/123", "/v21.0/123?fields=x", "/v21.0/1234"):
            with egress.get(base + target, endpoint="lookup", credential=only_lookup):
                pass
    assert [auth for _, auth in seen] == ["Bearer k", *[None] * 6, "Bearer k", None, None]
    assert "value=<redacted>" in repr(credential) and "Bearer k" not in repr(credential)


def test_a_credential_is_dropped_on_a_hop_to_another_path_of_the_same_host(
    make_settings: Any,
) -> None:
    seen: list[tuple[str, str | None]] = []
    with wsgi_server(_recording(seen, redirect_to="/v21.0/me?fields=id")) as base:
        scope = CredentialScope(Origin.of(base), ATTACHMENTS, "mid")
        credential = Credential("Authorization", "Bearer k", frozenset({scope}))
        with (
            Egress(local(make_settings, base)) as egress,
            egress.get(base + ATTACHMENTS + "?mid=1", endpoint="download", credential=credential),
        ):
            pass
    assert seen == [(ATTACHMENTS + "?mid=1", "Bearer k"), ("/v21.0/me?fields=id", None)]


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

    with wsgi_server(app) as base, Egress(local(make_settings, base)) as egress:
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
        Egress(local(make_settings, base)) as egress,
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
        Egress(local(make_settings, base)) as egress,
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
        Egress(local(make_settings, base)) as egress,
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
