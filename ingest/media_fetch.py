"""The bytes of one download attempt: located, downloaded and verified, never stored here.

The URL rule: the signed URL from the webhook is used while it is fresh (issued less than
``settings.url_fresh_seconds`` ago: at its receipt, or earlier for a late redelivery; decided
at claim time, :attr:`WorkItem.fresh_url`); otherwise, or when the CDN refuses it, the media id
is resolved for a new one. Every provider call is guarded by the number's error budget.

The body is spooled while hashed (small in memory, large on disk, capped at 100 MB and at any
stated size), compared with the webhook's and the lookup's sha256 and size (a mismatch is
retried once with a fresh URL), and its first bytes are checked against the declared MIME
type. A failure ends the attempt with :class:`AttemptFailed`; the transfer keeps the row's
lease as it goes (:meth:`InFlight.keep_lease`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ingest import metrics
from ingest.attempt_errors import AttemptFailed, describe, failure_for
from ingest.error_budget import BudgetExhausted, BudgetUnavailable, ErrorBudget, guarded, limits_for
from ingest.in_flight import Attempt, InFlight
from ingest.integrity import (
    BodyTooLarge,
    Expectation,
    HashingSpool,
    check_mime,
    checksum_problem,
)
from ingest.providers import ProviderError, UrlRejected
from ingest.retry_policy import Outcome
from ingest.settings import Settings

# The pipeline's logger: these lines are part of an attempt's story, read and filtered with it.
log = logging.getLogger("ingest.pipeline")


@dataclass
class Verified:
    spool: HashingSpool
    mime: str


@dataclass(frozen=True)
class MediaFetch:
    settings: Settings
    budget: ErrorBudget
    in_flight: InFlight
    clock: Callable[[], datetime]

    def fetch(self, attempt: Attempt) -> Verified:
        work = attempt.work
        if self.clock() >= work.expires_at:
            raise AttemptFailed(Outcome.EXPIRED, "media id expired before a copy was stored")
        if not work.connected:
            raise AttemptFailed(
                Outcome.INSTANCE_DISCONNECTED, "instance is marked disconnected; no call made"
            )
        url = work.fresh_url
        if url is not None:
            attempt.url_used = True
        else:
            url = self._resolve(attempt)
        # One fresh URL is allowed for a URL the CDN refused, and one for bytes that did not
        # match: enough to get past a stale link or a corrupted transfer, never a loop.
        refresh_for_rejection = refresh_for_mismatch = True
        while True:
            spool = HashingSpool(cap=self._cap(attempt))
            try:
                self._download(attempt, url, spool)
                problem = checksum_problem(spool.size, spool.sha256, self._expected(attempt))
                if problem is None:
                    verdict = check_mime(self._declared_mime(attempt), spool.head)
                    if not verdict.ok:
                        raise AttemptFailed(Outcome.UNSUPPORTED_TYPE, verdict.problem or "")
                    return Verified(spool, verdict.mime)
            except UrlRejected as exc:
                spool.close()
                if not (refresh_for_rejection and work.media_id):
                    raise AttemptFailed(Outcome.URL_REJECTED, describe(exc)) from None
                refresh_for_rejection = False
                url = self._resolve(attempt)
                continue
            except BaseException:
                spool.close()
                raise
            spool.close()
            if not (refresh_for_mismatch and work.media_id):
                raise AttemptFailed(Outcome.CHECKSUM_MISMATCH, problem)
            refresh_for_mismatch = False
            log.warning(
                "download item=%s checksum mismatch (%s); retrying with a fresh URL",
                work.id,
                problem,
            )
            url = self._resolve(attempt)

    def _resolve(self, attempt: Attempt) -> str:
        work = attempt.work
        if not work.media_id:
            raise AttemptFailed(Outcome.MEDIA_NOT_FOUND, "URL is stale and there is no media id")
        limits = limits_for(
            self.settings, work.credentials.provider, work.credentials.phone_number_id, "lookup"
        )
        attempt.resolves += 1
        metrics.URL_RESOLUTIONS.labels(work.credentials.provider.value).inc()
        try:
            with guarded(
                self.budget, limits, max_wait_seconds=self.settings.error_budget_wait_seconds
            ):
                location = attempt.client.resolve(work.media_id)
        except (ProviderError, BudgetExhausted, BudgetUnavailable) as exc:
            raise failure_for(exc, "lookup", work.credentials.provider) from None
        attempt.location = location
        return location.url

    def _download(self, attempt: Attempt, url: str, spool: HashingSpool) -> None:
        work = attempt.work
        limits = limits_for(
            self.settings, work.credentials.provider, work.credentials.phone_number_id, "download"
        )
        attempt.downloads += 1
        try:
            with (
                guarded(
                    self.budget, limits, max_wait_seconds=self.settings.error_budget_wait_seconds
                ) as reservation,
                self.in_flight.holding(attempt, reservation),
                attempt.client.download(url, max_bytes=spool.cap) as chunks,
            ):
                for chunk in chunks:
                    spool.write(chunk)
                    self.in_flight.keep_lease(attempt, "while downloading; stopped without storing")
        except UrlRejected:
            raise
        except (ProviderError, BudgetExhausted, BudgetUnavailable) as exc:
            raise failure_for(exc, "download", work.credentials.provider) from None
        except BodyTooLarge as exc:
            raise AttemptFailed(Outcome.TOO_LARGE, str(exc)) from None
        except OSError as exc:
            # The local spool (temp disk) failed: this machine's problem, not the media's.
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, f"spooling failed: {exc.strerror or 'OSError'}"
            ) from None

    def _cap(self, attempt: Attempt) -> int:
        """100 MB, and never more than any size the provider stated."""
        caps = [self.settings.max_media_bytes]
        if attempt.work.declared_size is not None:
            caps.append(attempt.work.declared_size)
        if attempt.location is not None and attempt.location.file_size is not None:
            caps.append(attempt.location.file_size)
        return min(caps)

    def _expected(self, attempt: Attempt) -> list[Expectation]:
        work = attempt.work
        expected = [Expectation("webhook", work.declared_sha256, work.declared_size)]
        if attempt.location is not None:
            expected.append(
                Expectation("lookup", attempt.location.sha256, attempt.location.file_size)
            )
        return expected

    def _declared_mime(self, attempt: Attempt) -> str | None:
        if attempt.work.declared_mime:
            return attempt.work.declared_mime
        return attempt.location.mime_type if attempt.location is not None else None
