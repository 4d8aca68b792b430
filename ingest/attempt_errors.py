"""How a failure ends a download attempt: :class:`AttemptFailed`, with an outcome of the retry
table (:mod:`ingest.retry_policy`) and a detail safe to store.

:func:`failure_for` maps a provider or error-budget error to its outcome and counts it
(``PROVIDER_ERRORS``, ``BUDGET_BLOCKED``). A detail is written to ``last_error``, which is for
operators: short (:func:`short`), and never a URL or a secret.
"""

from __future__ import annotations

from datetime import datetime

from ingest.error_budget import BudgetExhausted, BudgetUnavailable
from ingest.models import Provider
from ingest.providers import (
    DisallowedHost,
    MediaNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TooLarge,
    UrlRejected,
)
from ingest.retry_policy import Outcome

MAX_ERROR_CHARS = 300


class AttemptFailed(Exception):
    """Ends an attempt with an outcome of the retry table. ``detail`` is safe to store."""

    def __init__(
        self,
        outcome: Outcome,
        detail: str,
        *,
        retry_after: float | None = None,
        not_before: datetime | None = None,
    ) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        self.not_before = not_before


def failure_for(exc: Exception, endpoint: str, provider: Provider) -> AttemptFailed:
    """Provider and budget errors -> the outcome the retry table knows them by."""
    # Here, not at the top: ingest.callbacks imports this module for short(), and the CLI
    # imports callbacks before `ingest web` and `ingest worker` configure prometheus_client.
    from ingest import metrics

    if isinstance(exc, BudgetExhausted):
        metrics.BUDGET_BLOCKED.labels(provider.value, exc.key.split(":", 1)[0]).inc()
        return AttemptFailed(
            Outcome.BUDGET_EXHAUSTED,
            f"error budget for this number is spent ({endpoint})",
            not_before=exc.retry_at,
        )
    if isinstance(exc, BudgetUnavailable):
        return AttemptFailed(Outcome.BUDGET_UNAVAILABLE, f"error budget unavailable: {exc}")
    assert isinstance(exc, ProviderError)
    metrics.PROVIDER_ERRORS.labels(
        provider.value, endpoint, f"{exc.status // 100}xx" if exc.status else "none"
    ).inc()
    detail = describe(exc)
    if isinstance(exc, ProviderRejected):
        return AttemptFailed(Outcome.PROVIDER_REJECTED, detail)
    if isinstance(exc, ProviderAuthError):
        return AttemptFailed(Outcome.INSTANCE_UNAUTHORIZED, detail)
    if isinstance(exc, MediaNotFound):
        return AttemptFailed(Outcome.MEDIA_NOT_FOUND, detail)
    if isinstance(exc, UrlRejected):
        return AttemptFailed(Outcome.URL_REJECTED, detail)
    if isinstance(exc, ProviderThrottled):
        return AttemptFailed(Outcome.THROTTLED, detail, retry_after=exc.retry_after)
    if isinstance(exc, ProviderUnavailable):
        return AttemptFailed(Outcome.PROVIDER_UNAVAILABLE, detail, retry_after=exc.retry_after)
    if isinstance(exc, DisallowedHost):
        return AttemptFailed(Outcome.DISALLOWED_HOST, detail)
    if isinstance(exc, TooLarge):
        return AttemptFailed(Outcome.TOO_LARGE, detail)
    if exc.retryable:
        return AttemptFailed(Outcome.PROVIDER_UNAVAILABLE, detail, retry_after=exc.retry_after)
    return AttemptFailed(Outcome.PROVIDER_ERROR, detail)


def describe(exc: ProviderError) -> str:
    # Provider error messages never contain a URL or a key (the providers' contract).
    status = f"HTTP {exc.status}: " if exc.status else ""
    return short(f"{exc.endpoint} {status}{exc}")


def short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
