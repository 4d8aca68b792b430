"""The retry policy as one table: what each outcome of an attempt does to its row.

Every attempt ends in exactly one :class:`Outcome`; :data:`RULES` says whether the row is
stored, failed (with which reason code), retried (and how the delay is chosen), and whether
the instance is marked disconnected. Backoff lives in the row's ``next_attempt_at``; a retry
that would land past the media id's 7 days gives up as ``expired`` instead.

Delays (``retry_base_seconds`` = 15 s, ``retry_max_seconds`` = 1 h by default) double per
attempt with "equal jitter" (half fixed, half random), so workers that failed together do not
come back together: attempt 1 -> 7.5-15 s, 2 -> 15-30 s, 3 -> 30-60 s ... capped at 30-60 min.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from ingest.models import MediaState
from ingest.settings import Settings


class Outcome(enum.StrEnum):
    STORED = "stored"
    PROVIDER_REJECTED = "provider_rejected"  # 400: the request will never succeed
    INSTANCE_UNAUTHORIZED = "instance_unauthorized"  # 401/403 from the lookup
    INSTANCE_DISCONNECTED = "instance_disconnected"  # already marked: no call made
    MEDIA_NOT_FOUND = "media_not_found"  # 404 from the lookup (the URL had gone stale)
    URL_REJECTED = "url_rejected"  # the CDN refused a URL we had just resolved
    THROTTLED = "throttled"  # 429
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # 5xx, timeout, connection error
    DISALLOWED_HOST = "disallowed_host"  # a URL or redirect outside the allowlist
    PROVIDER_ERROR = "provider_error"  # any other provider failure that will not pass
    TOO_LARGE = "too_large"
    CHECKSUM_MISMATCH = "checksum_mismatch"  # still wrong after a fresh URL
    UNSUPPORTED_TYPE = "unsupported_type"  # bytes contradict the declared MIME type
    STORAGE_UNAVAILABLE = "storage_unavailable"  # object store or local spool failed
    BUDGET_UNAVAILABLE = "budget_unavailable"  # the error budget's store failed: no call made
    BUDGET_EXHAUSTED = "budget_exhausted"  # the number's error budget is spent: no call made
    WORKER_LOST = "worker_lost"  # the lease ran out max_lease_losses times
    EXPIRED = "expired"  # the 7 days passed


class Action(enum.StrEnum):
    STORE = "store"
    FAIL = "fail"
    RETRY = "retry"
    EXPIRE = "expire"


class Delay(enum.StrEnum):
    NONE = "none"
    BACKOFF = "backoff"  # exponential with jitter, from the attempt count
    OPERATOR = "operator"  # waits for a person (credentials): a long, fixed pause
    NOT_BEFORE = "not_before"  # the caller knows when (the budget window frees)


@dataclass(frozen=True)
class Rule:
    action: Action
    reason: str | None = None  # failure_reason code for FAIL
    delay: Delay = Delay.NONE
    disconnect: bool = False  # mark the instance disconnected
    # False when no provider call was made: the attempt is given back.
    counts_attempt: bool = True


RULES: dict[Outcome, Rule] = {
    Outcome.STORED: Rule(Action.STORE),
    Outcome.PROVIDER_REJECTED: Rule(Action.FAIL, "provider_rejected"),
    Outcome.INSTANCE_UNAUTHORIZED: Rule(Action.RETRY, delay=Delay.OPERATOR, disconnect=True),
    Outcome.INSTANCE_DISCONNECTED: Rule(Action.RETRY, delay=Delay.OPERATOR, counts_attempt=False),
    Outcome.MEDIA_NOT_FOUND: Rule(Action.FAIL, "media_not_found"),
    Outcome.URL_REJECTED: Rule(Action.RETRY, delay=Delay.BACKOFF),
    Outcome.THROTTLED: Rule(Action.RETRY, delay=Delay.BACKOFF),
    Outcome.PROVIDER_UNAVAILABLE: Rule(Action.RETRY, delay=Delay.BACKOFF),
    Outcome.DISALLOWED_HOST: Rule(Action.FAIL, "provider_error"),
    Outcome.PROVIDER_ERROR: Rule(Action.FAIL, "provider_error"),
    Outcome.TOO_LARGE: Rule(Action.FAIL, "too_large"),
    Outcome.CHECKSUM_MISMATCH: Rule(Action.FAIL, "checksum_mismatch"),
    Outcome.UNSUPPORTED_TYPE: Rule(Action.FAIL, "unsupported_type"),
    Outcome.STORAGE_UNAVAILABLE: Rule(Action.RETRY, delay=Delay.BACKOFF),
    Outcome.BUDGET_UNAVAILABLE: Rule(Action.RETRY, delay=Delay.BACKOFF, counts_attempt=False),
    Outcome.BUDGET_EXHAUSTED: Rule(Action.RETRY, delay=Delay.NOT_BEFORE, counts_attempt=False),
    Outcome.WORKER_LOST: Rule(Action.FAIL, "worker_lost"),
    Outcome.EXPIRED: Rule(Action.EXPIRE),
}

# Every reason code a `failed` row can carry from the table (metrics, stats, redrive).
FAILURE_REASONS = sorted({rule.reason for rule in RULES.values() if rule.reason})

# Pause for rows of an instance whose credentials failed: long enough not to hammer the
# provider with a dead key, short enough that media flows soon after the operator fixes it.
OPERATOR_PAUSE_SECONDS = 300.0
# Spread of resumptions after a budget window frees, so blocked rows do not all fire at once.
NOT_BEFORE_SPREAD_SECONDS = 30.0


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    state: MediaState
    failure_reason: str | None
    next_attempt_at: datetime | None  # set for retries only
    disconnect: bool
    refund_attempt: bool


# Where an outcome that is not retried leaves the row.
_FINAL_STATES = {
    Action.STORE: MediaState.STORED,
    Action.FAIL: MediaState.FAILED,
    Action.EXPIRE: MediaState.EXPIRED,
}


def final_decision(outcome: Outcome) -> Decision:
    """The decision for an outcome that is never retried (store, fail, expire): it needs no
    attempt count or clock, so a statement over many rows (the reconciler giving up on
    ``worker_lost``) writes the same state and reason as one attempt would."""
    rule = RULES[outcome]
    if rule.action is Action.RETRY:
        raise ValueError(f"{outcome} is retried: its decision needs decide()")
    return Decision(outcome, _FINAL_STATES[rule.action], rule.reason, None, rule.disconnect, False)


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random) -> float:
    """Exponential in the attempts made so far (1 = first), with equal jitter, capped."""
    exponent = min(max(attempts, 1) - 1, 32)
    ceiling = min(settings.retry_max_seconds, settings.retry_base_seconds * 2.0**exponent)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def decide(
    outcome: Outcome,
    *,
    attempts: int,
    now: datetime,
    expires_at: datetime,
    settings: Settings,
    rng: random.Random,
    retry_after: float | None = None,
    not_before: datetime | None = None,
) -> Decision:
    """Apply the table. ``retry_after`` (the provider's, seconds) is a floor for the delay,
    capped at ``retry_max_seconds``; a negative or non-finite one is ignored."""
    rule = RULES[outcome]
    if rule.action is not Action.RETRY:
        return final_decision(outcome)

    if rule.delay is Delay.OPERATOR:
        delay = min(OPERATOR_PAUSE_SECONDS, settings.retry_max_seconds)
    elif rule.delay is Delay.NOT_BEFORE and not_before is not None:
        delay = max((not_before - now).total_seconds(), 0.0)
        delay += rng.uniform(0, NOT_BEFORE_SPREAD_SECONDS)
    else:
        delay = backoff_seconds(attempts, settings, rng)
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        # The header is outside text: honoured up to our own longest backoff, so "1e12"
        # neither overflows the datetime below nor parks the row past its 7 days.
        delay = max(delay, min(retry_after, settings.retry_max_seconds))
    # Compared in seconds, before a datetime is built: no delay, however long, can overflow it.
    if delay >= (expires_at - now).total_seconds():
        # Another try would start after the media id is gone: give up now, clearly.
        return Decision(Outcome.EXPIRED, MediaState.EXPIRED, None, None, rule.disconnect, False)
    next_attempt_at = now + timedelta(seconds=delay)
    return Decision(
        outcome,
        MediaState.PENDING,
        None,
        next_attempt_at,
        rule.disconnect,
        not rule.counts_attempt,
    )
