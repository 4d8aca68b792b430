"""What a provider call can end with: the endpoint it was, and the errors of the contract the
download pipeline codes against. Its own module because both sides raise them: the provider
clients (:mod:`ingest.providers`, status mapping in its docstring) and the outbound HTTP
policy beneath them (:mod:`ingest.egress`). Messages never contain a URL, a token or a key.
"""

from __future__ import annotations

from typing import Literal

Endpoint = Literal["lookup", "download"]


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
