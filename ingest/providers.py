"""Provider clients: turn a media id into a download location, and stream the bytes.

The first half is the contract the download pipeline codes against (types and errors); the
second half implements it for Meta's Cloud API and for 360dialog, on top of
:mod:`ingest.egress` (allowlist, address checks, redirects, credentials, size cap).

Status mapping (lookup = ``GET /<media-id>``, download = the signed CDN URL):

============  =====================  ==========================
status        lookup                 download
============  =====================  ==========================
400           ProviderRejected       ProviderRejected
401, 403      ProviderAuthError      UrlRejected
404           MediaNotFound          UrlRejected
410           ProviderRejected       UrlRejected
429           ProviderThrottled      ProviderThrottled
5xx           ProviderUnavailable    ProviderUnavailable
other 4xx     ProviderRejected       ProviderRejected
============  =====================  ==========================

``counts_against_budget`` is True for every error *response* (the provider's error-based
throttle counts those) and for failures after the request was sent (timeouts, broken
responses: the provider may have logged an error); False when the provider never saw the
request (DNS, connect, our allowlist) or answered 2xx with a body we cannot use.

Where the credential goes (provider-media-constraints.md): the lookup ``GET
<api base>/<media-id>``, built only from a checked media id (:func:`ingest.events.is_media_id`),
and CDN attachment URLs: ``/whatsapp_business/attachments/?mid=<media-id>&...`` on Meta's
``lookaside.fbsbx.com`` (and, for the Cloud API, on the Graph origin itself, where the sandbox
serves it), or 360dialog's rewrite of it, ``<360dialog base>/whatsapp_business/attachments/?...``.
A download URL of any other shape is not fetched at all (:class:`UrlRejected`, not counted:
the pipeline resolves the media id instead); a lookup answering one is unusable.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from ingest.egress import Egress, EgressResponse
from ingest.egress_guard import Credential, CredentialScope, Origin
from ingest.events import CDN_ATTACHMENT_PATH, is_attachment_url, is_media_id, unescape_slashes
from ingest.media_rules import normalize_sha256
from ingest.models import Provider
from ingest.provider_errors import (
    DisallowedHost,
    Endpoint,
    MediaNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TooLarge,
    UrlRejected,
)
from ingest.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """What a client needs of an instance; a plain value, safe to pass between threads."""

    provider: Provider
    phone_number_id: str
    api_key: str


@dataclass(frozen=True)
class MediaLocation:
    """The answer of a media lookup. ``url`` is signed and confidential: never log it."""

    url: str
    mime_type: str | None
    sha256: str | None  # lowercase hex, normalised from hex or base64
    file_size: int | None

    def __repr__(self) -> str:  # keep the signed URL out of logs and tracebacks
        return (
            f"MediaLocation(url=<redacted>, mime_type={self.mime_type!r}, "
            f"sha256={self.sha256!r}, file_size={self.file_size!r})"
        )


class ProviderClient(Protocol):
    credentials: Credentials

    def resolve(self, media_id: str) -> MediaLocation:
        """``GET /<media-id>``: a fresh signed URL plus the stated mime, sha256 and size."""
        ...

    def download(self, url: str, *, max_bytes: int) -> AbstractContextManager[Iterator[bytes]]:
        """Stream the decoded body of ``url``; raise :class:`TooLarge` past ``max_bytes``."""
        ...


# --- implementations ---------------------------------------------------------------------

LOOKASIDE_HOST = "lookaside.fbsbx.com"
D360_KEY_HEADER = "D360-API-KEY"
# A lookup answer is a few hundred bytes of JSON; anything much larger is not one.
LOOKUP_MAX_BYTES = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"
# 18 digits is up to an exabyte: a longer stated size is nonsense, read as "not stated".
MAX_SIZE_DIGITS = 18
# The CDN URL names its media id in this query parameter.
MEDIA_ID_PARAM = "mid"


def rewrite_for_d360(url: str, d360_url: str) -> str:
    """360dialog serves Meta's CDN paths itself: ``lookaside.fbsbx.com`` -> the 360 host.

    Keeps path and query; puts them under ``d360_url`` (scheme, host and any base path).
    JSON-escaped slashes (``https:\\/\\/``, also doubled) are undone first. A URL on any
    other host is returned unescaped but otherwise unchanged.
    """
    url = unescape_slashes(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # unreadable: left as it is, and refused as no CDN URL
        return url
    if (host or "").lower() != LOOKASIDE_HOST:
        return url
    base = urlsplit(d360_url)
    path = base.path.rstrip("/") + (parts.path or "/")
    return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))


def _origin(url: str) -> Origin:
    return Origin.of(url)


def _path_of(base_url: str) -> str:
    return urlsplit(base_url).path.rstrip("/")


def _raise_unless_ok(response: EgressResponse, endpoint: Endpoint) -> None:
    if response.status_code != 200:
        retry_after = _retry_after(response.headers.get("retry-after"))
        raise _status_error(response.status_code, endpoint, response.host, retry_after)


def _status_error(
    status: int, endpoint: Endpoint, host: str, retry_after: float | None
) -> ProviderError:
    where = f"{endpoint} at {host} answered {status}"
    if status == 429:
        return ProviderThrottled(where, endpoint=endpoint, status=status, retry_after=retry_after)
    if status >= 500:
        return ProviderUnavailable(where, endpoint=endpoint, status=status)
    if endpoint == "download":
        if status in (401, 403, 404, 410):
            return UrlRejected(where, endpoint=endpoint, status=status)
        return ProviderRejected(where, endpoint=endpoint, status=status)
    if status in (401, 403):
        return ProviderAuthError(where, endpoint=endpoint, status=status)
    if status == 404:
        return MediaNotFound(where, endpoint=endpoint, status=status)
    return ProviderRejected(where, endpoint=endpoint, status=status)


def _retry_after(value: str | None) -> float | None:
    """Seconds the provider asked us to wait, as it said them (the retry policy caps them).

    The header is the provider's (or a proxy's) text: "inf" and "nan" parse as floats but
    are no wait at all, and a negative wait means nothing. Those are ignored and our own
    backoff applies, as for an HTTP date.
    """
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: rare from these providers; our own backoff applies
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _decode_lookup(body: bytes, host: str) -> dict[str, Any]:
    """JSON of a lookup; gzip is sniffed too, since 360dialog may compress without saying so."""
    if body[:2] == _GZIP_MAGIC:
        try:
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            body = inflater.decompress(body, LOOKUP_MAX_BYTES + 1)
        except zlib.error:
            body = b""
        if len(body) > LOOKUP_MAX_BYTES:
            body = b""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8 and JSON, and a number over Python's 4300-digit limit;
        # RecursionError, nesting deeper than the parser's stack.
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("url"), str) or not data["url"]:
        raise ProviderUnavailable(
            f"lookup at {host} answered 200 without a media URL",
            endpoint="lookup",
            status=200,
            counts_against_budget=False,
        )
    return data


def _file_size(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    # ASCII digits only: isdigit() also passes "²", which int() then refuses. The length cap
    # keeps int() clear of Python's 4300-digit limit.
    digits = value.strip() if isinstance(value, str) else ""
    if digits.isascii() and digits.isdecimal() and len(digits) <= MAX_SIZE_DIGITS:
        return int(digits)
    return None


class _HttpClient:
    """What both providers share: lookup JSON, download streaming, status mapping.

    ``cdn`` lists where this provider's CDN attachment URLs live: ``(origin, base path)``.
    """

    credentials: Credentials

    def __init__(
        self,
        credentials: Credentials,
        settings: Settings,
        egress_client: Egress,
        header: str,
        value: str,
        lookup_base: str,
        cdn: frozenset[tuple[Origin, str]],
    ) -> None:
        self.credentials = credentials
        self._settings = settings
        self._egress = egress_client
        self._header = header
        self._value = value
        self._lookup_base = lookup_base
        self._cdn = cdn
        self._cdn_credential = Credential(
            header,
            value,
            frozenset(
                CredentialScope(origin, base + CDN_ATTACHMENT_PATH, MEDIA_ID_PARAM)
                for origin, base in cdn
            ),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(phone_number_id={self.credentials.phone_number_id!r})"

    def resolve(self, media_id: str) -> MediaLocation:
        if not is_media_id(media_id):
            # Never turned into a URL path: ".." or "a/b" would reach another API endpoint
            # with the instance's credential.
            raise ProviderRejected(
                "media id is not a provider media id",
                endpoint="lookup",
                counts_against_budget=False,
            )
        url = f"{self._lookup_base}/{media_id}"
        # Scoped to this one lookup: the API origin's other paths never see the credential.
        credential = Credential(
            self._header,
            self._value,
            # The path as httpx will send it, so the scope compares like with like.
            frozenset({CredentialScope(_origin(url), httpx.URL(url).raw_path.decode())}),
        )
        with self._egress.get(url, endpoint="lookup", credential=credential) as response:
            _raise_unless_ok(response, "lookup")
            body = response.read(LOOKUP_MAX_BYTES)
            data = _decode_lookup(body, response.host)
            download_url = self.download_url(str(data["url"]))
            if not self.is_cdn_url(download_url):
                raise ProviderUnavailable(
                    f"lookup at {response.host} answered a URL that is not a CDN attachment URL",
                    endpoint="lookup",
                    status=200,
                    counts_against_budget=False,
                )
        return MediaLocation(
            url=download_url,
            mime_type=data.get("mime_type") if isinstance(data.get("mime_type"), str) else None,
            sha256=normalize_sha256(data["sha256"])
            if isinstance(data.get("sha256"), str)
            else None,
            file_size=_file_size(data.get("file_size")),
        )

    def download_url(self, url: str) -> str:
        return unescape_slashes(url)

    def is_cdn_url(self, url: str) -> bool:
        """Is ``url`` (as :meth:`download_url` made it) an attachment URL of this provider's
        CDN: one of its origins, the attachment path under that origin's base, a ``mid``?"""
        try:
            origin = _origin(url)
        except (httpx.InvalidURL, ValueError):
            return False
        return any(
            origin == cdn_origin and is_attachment_url(url, base_path=base)
            for cdn_origin, base in self._cdn
        )

    @contextmanager
    def _download(self, url: str, max_bytes: int) -> Iterator[Iterator[bytes]]:
        target = self.download_url(url)
        if not self.is_cdn_url(target):
            # A webhook URL of another shape (another path of the provider's host, a local
            # port): never fetched. The pipeline resolves the media id on a UrlRejected; not
            # counted, since the provider never saw it. The URL itself is never logged.
            log.warning(
                "download: %s URL is not a CDN attachment URL; not fetched, resolving instead",
                self.credentials.provider.value,
            )
            raise UrlRejected(
                "URL is not a CDN attachment URL; not fetched",
                endpoint="download",
                counts_against_budget=False,
            )
        with self._egress.get(
            target, endpoint="download", credential=self._cdn_credential
        ) as response:
            _raise_unless_ok(response, "download")
            yield response.iter_bytes(max_bytes)

    def download(self, url: str, *, max_bytes: int) -> AbstractContextManager[Iterator[bytes]]:
        return self._download(url, max_bytes)


class CloudApiClient(_HttpClient):
    """Meta Cloud API: ``Authorization: Bearer``, to Graph lookups and Meta's CDN only.

    CDN URLs are accepted on ``lookaside.fbsbx.com`` and on the Graph origin itself (at its
    root: where a stand-in such as the sandbox serves both; Meta's own host is trusted with
    the token anyway).
    """

    def __init__(self, credentials: Credentials, settings: Settings, egress_client: Egress) -> None:
        cdn = frozenset(
            {(_origin(f"https://{LOOKASIDE_HOST}"), ""), (_origin(settings.graph_url), "")}
        )
        super().__init__(
            credentials,
            settings,
            egress_client,
            "Authorization",
            f"Bearer {credentials.api_key}",
            settings.graph_url,
            cdn,
        )


class D360Client(_HttpClient):
    """360dialog: ``D360-API-KEY``, to the 360dialog host only; CDN URLs are re-hosted there
    (``lookaside.fbsbx.com/whatsapp_business/attachments/`` becomes
    ``<d360 base>/whatsapp_business/attachments/``)."""

    def __init__(self, credentials: Credentials, settings: Settings, egress_client: Egress) -> None:
        cdn = frozenset({(_origin(settings.d360_url), _path_of(settings.d360_url))})
        super().__init__(
            credentials,
            settings,
            egress_client,
            D360_KEY_HEADER,
            credentials.api_key,
            settings.d360_url,
            cdn,
        )

    def download_url(self, url: str) -> str:
        return rewrite_for_d360(url, self._settings.d360_url)


def client_for(credentials: Credentials, settings: Settings, egress: Egress) -> ProviderClient:
    """The client for an instance's provider; cheap to build (the egress pool is shared)."""
    if credentials.provider is Provider.D360:
        return D360Client(credentials, settings, egress)
    return CloudApiClient(credentials, settings, egress)


# The contract's errors live in ingest.provider_errors (egress raises them too); they are part
# of this module's interface for the pipeline and the retry table.
__all__ = [
    "LOOKASIDE_HOST",
    "CloudApiClient",
    "Credentials",
    "D360Client",
    "DisallowedHost",
    "Endpoint",
    "MediaLocation",
    "MediaNotFound",
    "ProviderAuthError",
    "ProviderClient",
    "ProviderError",
    "ProviderRejected",
    "ProviderThrottled",
    "ProviderUnavailable",
    "TooLarge",
    "UrlRejected",
    "client_for",
    "rewrite_for_d360",
]
