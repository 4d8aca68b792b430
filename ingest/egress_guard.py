"""The address guard under every outbound connection: which hosts, ports and addresses may be
reached, and where a credential may go.

- A :class:`HostPolicy` lists the hosts and ports that may be fetched (``settings.media_hosts``:
  a name, ``.example.com`` for any name ending in it, or an address, with ``:port`` or
  without, then only the scheme's default port). Private, loopback, link-local, multicast and
  reserved addresses are refused unless that literal address is itself listed with that port.
  :class:`PublicAddressPolicy` (callbacks) allows any name and port but the same addresses.
- The check runs inside the connection pool's network backend (:class:`GuardedTransport`),
  and the socket connects to the address that was checked, so a DNS answer that changes
  between check and connect (DNS rebinding) cannot slip through.
- A :class:`Credential` is sent only where its scopes say (an origin and an exact path, see
  :class:`CredentialScope`); never to another path or query of the same host.

:mod:`ingest.egress` builds the provider client on this; :func:`guarded_client` is the plain
client for other requests (callbacks).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import parse_qsl

import httpcore
import httpx

from ingest.settings import split_media_host

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


class GuardedTransport(httpx.HTTPTransport):
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
        transport=GuardedTransport(policy, resolver or system_resolver, max_connections),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": user_agent},
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
