"""Provider clients: turn a media id into a download location, and stream the bytes.

PLACEHOLDER for the implementations (Meta Cloud API, 360dialog): the types and errors below
are the contract the download pipeline codes against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from ingest.models import Provider

Endpoint = Literal["lookup", "download"]


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


class ProviderError(Exception):
    """A provider call failed. Messages never contain a URL, a token or a key.

    ``status`` is the HTTP status when there was a response; ``counts_against_budget`` is
    True when the provider saw an error response (its error-based throttle counts those).
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: Endpoint,
        status: int | None = None,
        counts_against_budget: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.counts_against_budget = counts_against_budget
        self.retry_after = retry_after


class ProviderRejected(ProviderError):
    """400 (or another 4xx that will never change): never retried."""


class ProviderAuthError(ProviderError):
    """401/403 from the media lookup: the instance's credentials no longer work."""


class MediaNotFound(ProviderError):
    """404 from the media lookup: the media id is unknown or gone."""


class UrlRejected(ProviderError):
    """The CDN refused a download URL (401/403/404/410): it expired; resolve a new one."""


class ProviderThrottled(ProviderError):
    """429: back off (``retry_after`` when the provider said)."""

    retryable = True


class ProviderUnavailable(ProviderError):
    """5xx, timeout, connection failure: back off and retry."""

    retryable = True


class DisallowedHost(ProviderError):
    """A URL (or a redirect hop) points outside the allowlist or at a private address."""


class TooLarge(ProviderError):
    """The body passed the cap (100 MB, or the size the lookup stated): aborted."""


class ProviderClient(Protocol):
    credentials: Credentials

    def resolve(self, media_id: str) -> MediaLocation:
        """``GET /<media-id>``: a fresh signed URL plus the stated mime, sha256 and size."""
        ...

    def download(self, url: str, *, max_bytes: int) -> AbstractContextManager[Iterator[bytes]]:
        """Stream the decoded body of ``url``; raise :class:`TooLarge` past ``max_bytes``."""
        ...
