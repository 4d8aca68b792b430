"""The provider client's HTTP: the only way the service talks to a provider or its CDN.

One :class:`Egress` per worker process (thread-safe, pooled), on the address guard of
:mod:`ingest.egress_guard`. Every request, and every hop of a redirect, is checked against
``settings.media_hosts`` before it is sent, and again where the socket is opened:

- redirects are followed here, never by httpx, so each hop is re-checked;
- a credential is sent only where its scopes say (:class:`ingest.egress_guard.Credential`), on
  every hop;
- the body is decoded here (gzip/deflate) in bounded steps, so a compression bomb is cut off
  as soon as the *decoded* size passes the cap, without ever inflating it in memory.

Errors are the provider contract's exceptions; their messages name a host, never a URL.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

import httpx

from ingest import provider_errors
from ingest.egress_guard import (
    Credential,
    GuardedTransport,
    HostPolicy,
    Origin,
    RefusedAddress,
    Resolver,
    system_resolver,
)
from ingest.settings import Settings

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
        self._transport = GuardedTransport(
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


__all__ = ["ACCEPT_ENCODING", "MAX_REDIRECTS", "Egress", "EgressResponse"]
