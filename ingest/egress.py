"""Outbound HTTP policy: the only way the service talks to a provider or its CDN.

One :class:`Egress` per worker process (thread-safe, pooled). Every request, and every hop of
a redirect, is checked against the same rules:

- only hosts and ports on ``settings.media_hosts`` are fetched: an entry is a name (or
  ``.example.com``, any name ending in it) or an address, with ``:port`` or without (then
  only the scheme's default port, 80 or 443). Redirects are followed here, never by httpx,
  so each hop is re-checked;
- at connection time the host and port are checked again, the name is resolved, and
  private, loopback, link-local, multicast and reserved addresses are refused unless that
  literal address is itself on the allowlist with that port. The check runs inside the
  connection pool's network backend and the socket connects to the address that was checked,
  so a DNS answer that changes between check and connect (DNS rebinding) cannot slip through;
- a credential is sent only where its scopes say (an origin and an exact path, see
  :class:`CredentialScope`), on every hop; never to another path or query of the same host;
- the body is decoded here (gzip/deflate) in bounded steps, so a compression bomb is cut off
  as soon as the *decoded* size passes the cap, without ever inflating it in memory.

Errors are the provider contract's exceptions; their messages name a host, never a URL.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import httpcore
import httpx

from ingest import provider_errors
from ingest.settings import Settings, split_media_host

# httpx and httpcore log every request line, full URL and query included, at INFO/DEBUG.
# Signed media URLs are confidential, so their loggers never pass anything below WARNING,
# whatever the process's log level is.
for _noisy in ("httpx", "httpcore"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

if TYPE_CHECKING:
    from ingest.provider_errors import Endpoint

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# Sized for a worker with ~32 threads: each thread holds at most one connection at a time.
POOL_CONNECTIONS = 32
DECODE_STEP = 64 * 1024
ACCEPT_ENCODING = "gzip, deflate"

Resolver = Callable[[str, int], list[str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str | httpx.URL) -> Origin:
        parsed = httpx.URL(url) if isinstance(url, str) else url
        scheme = parsed.scheme.lower()
        port = parsed.port or (443 if scheme == "https" else 80)
        return cls(scheme, parsed.host.lower(), port)


@dataclass(frozen=True)
class CredentialScope:
    """One place a credential may be sent: an origin and an exact (raw) path.

    With ``query_key``, the query must carry that parameter exactly once (the CDN's ``mid``);
    without, the request must have no query at all. A different path on the same origin (the
    Graph API's other endpoints, the sandbox's control routes) never sees the credential.
    """

    origin: Origin
    path: str
    query_key: str | None = None

    def covers(self, url: httpx.URL) -> bool:
        if url.userinfo or Origin.of(url) != self.origin:
            return False
        path, _, query = url.raw_path.partition(b"?")
        if path != self.path.encode("ascii"):
            return False
        if self.query_key is None:
            return not query
        try:
            pairs = parse_qsl(query.decode("ascii"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError):
            return False
        values = [value for key, value in pairs if key == self.query_key]
        return len(values) == 1 and bool(values[0])


@dataclass(frozen=True)
class Credential:
    """One header that authenticates us to a provider, and where it may be sent."""

    header: str
    value: str
    scopes: frozenset[CredentialScope]

    def covers(self, url: httpx.URL) -> bool:
        return any(scope.covers(url) for scope in self.scopes)

    def __repr__(self) -> str:  # the value is a secret
        where = sorted(f"{s.origin.host}:{s.origin.port}{s.path}" for s in self.scopes)
        return f"Credential(header={self.header!r}, value=<redacted>, scopes={where})"


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts, ports and addresses may be fetched (``settings.media_hosts``).

    Entries are ``(host, port)``: a name, a ``.suffix`` or an address, and a port or None.
    None means the scheme's default port: 80 for http, 443 for https (at connection time,
    where the scheme is not known, either of the two).
    """

    entries: frozenset[tuple[str, int | None]]

    @classmethod
    def from_hosts(cls, hosts: Iterable[str]) -> HostPolicy:
        return cls(frozenset(split_media_host(h) for h in hosts if h.strip()))

    def url_allowed(self, origin: Origin) -> bool:
        """The name (or literal address) and port of a URL, before any connection."""
        default = DEFAULT_PORTS.get(origin.scheme)
        return self._listed(_canonical(origin.host), origin.port, {default} if default else set())

    def name_allowed(self, host: str, port: int) -> bool:
        """The same rule at connection time, where only host and port are known."""
        return self._listed(_canonical(host), port, set(DEFAULT_PORTS.values()))

    def address_allowed(self, address: Address, port: int) -> bool:
        """Public unicast addresses pass (their name and port were checked); any other only
        when listed literally, with this port (or without one, for 80 and 443)."""
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        effective: Address = mapped or address
        if effective.is_global and not effective.is_multicast:
            return True
        defaults = set(DEFAULT_PORTS.values())
        return self._exact(str(effective), port, defaults) or self._exact(
            str(address), port, defaults
        )

    def _listed(self, host: str, port: int, defaults: set[int]) -> bool:
        if self._exact(host, port, defaults):
            return True
        return any(
            name.startswith(".") and host.endswith(name) and _port_matches(listed, port, defaults)
            for name, listed in self.entries
        )

    def _exact(self, host: str, port: int, defaults: set[int]) -> bool:
        return any(
            name == host and _port_matches(listed, port, defaults) for name, listed in self.entries
        )


@dataclass(frozen=True)
class PublicAddressPolicy(HostPolicy):
    """Any host name and port (an operator configured the URL, as with callbacks), but the
    addresses a name resolves to must be public unless that literal address is listed
    (entries: ``address`` for 80 and 443, or ``address:port``), checked at connection time
    by the same guarded backend as media downloads."""

    def url_allowed(self, origin: Origin) -> bool:
        return True

    def name_allowed(self, host: str, port: int) -> bool:
        return True


def _port_matches(listed: int | None, port: int, defaults: set[int]) -> bool:
    return port == listed if listed is not None else port in defaults


def _canonical(host: str) -> str:
    """Lowercase name without the root dot; an IP literal in its one standard spelling."""
    host = host.strip().lower().strip("[]").rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class _GuardedBackend(httpcore.SyncBackend):
    """Resolve, check every address against the policy, connect to a checked one."""

    def __init__(self, policy: HostPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        # The URL was checked before the request; checked again here, where the socket is
        # opened, so no path around that check (a pooled request, a future caller) connects
        # to a host or port off the list.
        if not self._policy.name_allowed(host, port):
            raise RefusedAddress(host)
        try:
            candidates = self._resolver(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        allowed = [
            a for a in candidates if self._policy.address_allowed(ipaddress.ip_address(a), port)
        ]
        if not allowed:
            # Raised through httpcore and httpx untouched (they only map their own errors).
            raise RefusedAddress(host)
        last: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in allowed:
            try:
                return super().connect_tcp(
                    address, port, timeout, local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last


class RefusedAddress(Exception):
    """Every address of a host is refused. Raised where the socket would be opened, it passes
    through httpcore and httpx untouched (it is not one of their errors): :class:`Egress`
    maps it to the provider contract's error, a :func:`guarded_client`'s caller catches it."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> bytes:
        return b""


class _Inflate:
    """gzip or deflate (zlib-wrapped, or raw as some servers send it), in bounded steps.

    Each step inflates at most ``DECODE_STEP`` bytes, so a small compressed chunk that would
    expand to gigabytes is consumed piece by piece and the caller can stop at the cap.
    """

    def __init__(self, encoding: str) -> None:
        self._gzip = encoding in ("gzip", "x-gzip")
        self._obj = zlib.decompressobj(zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self._started and data:
            self._started = True
            if not self._gzip and (data[0] & 0x0F) != 8:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, no zlib header
        pending = data
        while pending and not self._obj.eof:
            try:
                out = self._obj.decompress(pending, DECODE_STEP)
            except zlib.error as exc:
                raise _BadEncoding from exc
            pending = self._obj.unconsumed_tail
            if out:
                yield out

    def finish(self) -> bytes:
        try:
            return self._obj.flush()
        except zlib.error as exc:
            raise _BadEncoding from exc


class _BadEncoding(Exception):
    pass


def _decoder(content_encoding: str) -> _Identity | _Inflate:
    """One coding at most: providers use gzip or nothing; stacked codings are refused."""
    names = [n.strip().lower() for n in content_encoding.split(",")]
    names = [n for n in names if n and n != "identity"]
    if not names:
        return _Identity()
    if len(names) == 1 and names[0] in ("gzip", "x-gzip", "deflate"):
        return _Inflate(names[0])
    raise ValueError(content_encoding)


@dataclass
class EgressResponse:
    """A response whose body has not been read yet. ``iter_bytes`` yields decoded bytes."""

    status_code: int
    headers: httpx.Headers
    host: str
    endpoint: Endpoint
    _response: httpx.Response = field(repr=False)
    _consumed: bool = field(default=False, repr=False)

    def iter_bytes(self, max_bytes: int) -> Iterator[bytes]:
        """Decoded body; :class:`TooLarge` as soon as more than ``max_bytes`` were decoded."""
        if self._consumed:
            raise RuntimeError("body already read")
        self._consumed = True
        encoding = self.headers.get("content-encoding", "")
        length = self.headers.get("content-length")
        # Without a coding the wire size is the decoded size: refuse before reading a byte.
        declared = int(length) if length is not None and length.isdigit() else None
        if not encoding.strip() and declared is not None and declared > max_bytes:
            raise self._too_large(max_bytes)
        try:
            decoder = _decoder(encoding)
        except ValueError:
            raise self._undecodable("answered with an unsupported content encoding") from None
        total = 0
        with _mapped_errors(self.endpoint, self.host, sent=True):
            try:
                for raw in self._response.iter_raw():
                    for piece in decoder.feed(raw):
                        total += len(piece)
                        if total > max_bytes:
                            raise self._too_large(max_bytes)
                        yield piece
                tail = decoder.finish()
            except _BadEncoding:
                raise self._undecodable("sent a body that does not decode") from None
            if tail:
                total += len(tail)
                if total > max_bytes:
                    raise self._too_large(max_bytes)
                yield tail

    def read(self, max_bytes: int) -> bytes:
        return b"".join(self.iter_bytes(max_bytes))

    def _undecodable(self, what: str) -> provider_errors.ProviderUnavailable:
        # The provider answered; its encoding is the fault, not an error response it counts.
        return provider_errors.ProviderUnavailable(
            f"{self.host} {what}",
            endpoint=self.endpoint,
            status=self.status_code,
            counts_against_budget=False,
        )

    def _too_large(self, max_bytes: int) -> provider_errors.TooLarge:
        return provider_errors.TooLarge(
            f"body from {self.host} is over {max_bytes} bytes",
            endpoint=self.endpoint,
            status=self.status_code,
            counts_against_budget=False,
        )


@contextmanager
def _mapped_errors(endpoint: Endpoint, host: str, *, sent: bool) -> Iterator[None]:
    """httpx errors -> contract errors; the message names the host and the kind only.

    ``counts_against_budget``: a request that never reached the provider (DNS, connect, pool)
    cannot have been counted by its error throttle; once the request was sent, a timeout or a
    broken response may well have been logged as an error on its side, so we count it: over-
    counting only delays us, under-counting risks a 30-minute block.
    """
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise provider_errors.ProviderUnavailable(
            f"cannot connect to {host} ({type(exc).__name__})",
            endpoint=endpoint,
            counts_against_budget=False,
        ) from None
    except httpx.TimeoutException as exc:
        raise provider_errors.ProviderUnavailable(
            f"{host} timed out ({type(exc).__name__})", endpoint=endpoint
        ) from None
    except httpx.TransportError as exc:
        raise provider_errors.ProviderUnavailable(
            f"connection to {host} failed ({type(exc).__name__})",
            endpoint=endpoint,
            counts_against_budget=sent,
        ) from None
    except RefusedAddress as exc:
        raise provider_errors.DisallowedHost(
            f"{exc.host} resolves to an address that is not allowed",
            endpoint=endpoint,
            counts_against_budget=False,
        ) from None


class Egress:
    """The outbound HTTP client of one process. Thread-safe; close it on shutdown."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver | None = None,
        max_connections: int = POOL_CONNECTIONS,
    ) -> None:
        self.policy = HostPolicy.from_hosts(settings.media_hosts)
        self._transport = _GuardedTransport(
            self.policy, resolver or system_resolver, max_connections
        )
        self._client = httpx.Client(
            transport=self._transport,
            follow_redirects=False,
            # Proxies from the environment would bypass the address check.
            trust_env=False,
            timeout=httpx.Timeout(settings.http_timeout_seconds),
            headers={"Accept-Encoding": ACCEPT_ENCODING, "User-Agent": "ingest-media/1"},
            # One client serves every instance of the process: a cookie set in answer to one
            # instance's request must never be sent with another's, so none is kept.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._client.close()

    def __enter__(self) -> Egress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def get(
        self,
        url: str,
        *,
        endpoint: Endpoint,
        credential: Credential | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[EgressResponse]:
        """GET ``url`` following redirects (re-checked hop by hop); yield the final response.

        The caller maps the status; the body is read with :meth:`EgressResponse.iter_bytes`.
        """
        current = _parse(url, endpoint)
        hops = 0
        while True:
            origin = _check_url(current, self.policy, endpoint)
            request_headers = dict(headers or {})
            if credential is not None and credential.covers(current):
                request_headers[credential.header] = credential.value
            request = self._client.build_request("GET", current, headers=request_headers)
            with _mapped_errors(endpoint, origin.host, sent=False):
                response = self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECT_STATUSES and location:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise provider_errors.ProviderUnavailable(
                            f"more than {MAX_REDIRECTS} redirects from {origin.host}",
                            endpoint=endpoint,
                            status=response.status_code,
                            counts_against_budget=False,
                        )
                    try:
                        current = current.join(location)
                    except httpx.InvalidURL:
                        raise provider_errors.ProviderUnavailable(
                            f"{origin.host} redirected to an unreadable location",
                            endpoint=endpoint,
                            status=response.status_code,
                            counts_against_budget=False,
                        ) from None
                    continue
                yield EgressResponse(
                    response.status_code, response.headers, origin.host, endpoint, response
                )
                return
            finally:
                response.close()


def _parse(url: str, endpoint: Endpoint) -> httpx.URL:
    try:
        return httpx.URL(url)
    except httpx.InvalidURL:
        raise provider_errors.DisallowedHost(
            "not a readable URL", endpoint=endpoint, counts_against_budget=False
        ) from None


def _check_url(url: httpx.URL, policy: HostPolicy, endpoint: Endpoint) -> Origin:
    if url.scheme not in ("http", "https") or not url.host:
        raise provider_errors.DisallowedHost(
            "only http(s) URLs with a host are fetched",
            endpoint=endpoint,
            counts_against_budget=False,
        )
    origin = Origin.of(url)
    if not policy.url_allowed(origin):
        raise provider_errors.DisallowedHost(
            f"host {origin.host} port {origin.port} is not on the allowlist",
            endpoint=endpoint,
            counts_against_budget=False,
        )
    return origin


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's transport on a connection pool whose network backend is :class:`_GuardedBackend`.

    httpx offers no parameter for the network backend, so the pool it built is replaced by an
    identical one that has it (tests/ingest/test_egress.py proves the guard is in the path).
    """

    def __init__(self, policy: HostPolicy, resolver: Resolver, max_connections: int) -> None:
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
        )
        super().__init__(limits=limits, retries=0)
        ssl_context = httpx.create_ssl_context()
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_GuardedBackend(policy, resolver),
        )


def guarded_client(
    policy: HostPolicy,
    *,
    timeout: float,
    user_agent: str,
    resolver: Resolver | None = None,
    max_connections: int = 4,
) -> httpx.Client:
    """A plain httpx client whose connections pass the address guard of ``policy``: no
    redirects followed, no proxies or cookies from anywhere. For requests other than the
    provider's (callbacks); a refused address raises :class:`RefusedAddress`."""
    return httpx.Client(
        transport=_GuardedTransport(policy, resolver or system_resolver, max_connections),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": user_agent},
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


__all__ = [
    "ACCEPT_ENCODING",
    "MAX_REDIRECTS",
    "Credential",
    "CredentialScope",
    "Egress",
    "EgressResponse",
    "HostPolicy",
    "Origin",
    "PublicAddressPolicy",
    "RefusedAddress",
    "guarded_client",
    "system_resolver",
]
