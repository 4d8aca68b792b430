"""SQL is the source of truth: accounts, instances, API tokens and one row per media item.

The broker only wakes workers up; every fact needed to finish (or restart) a download is
in :class:`MediaItem`.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    # Deterministic constraint names so Alembic migrations match on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Provider(enum.StrEnum):
    CLOUD = "cloud"
    D360 = "360dialog"


class MediaType(enum.StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    DOCUMENT = "document"
    STICKER = "sticker"


class MediaState(enum.StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    STORED = "stored"
    FAILED = "failed"
    EXPIRED = "expired"
    # The bytes were deleted on purpose and only the row is kept, as the audit of what was
    # archived and when it went: past the instance's retention, or on an erasure request.
    PURGED = "purged"
    ERASED = "erased"


# Where a download ends; the states after it are only ever set by an operator's decision.
TERMINAL_STATES = frozenset({MediaState.STORED, MediaState.FAILED, MediaState.EXPIRED})
REMOVED_STATES = frozenset({MediaState.PURGED, MediaState.ERASED})


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="account")


class Instance(Base):
    """One WhatsApp phone number behind one provider, with its credentials."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    provider: Mapped[str] = mapped_column(String(20))
    phone_number_id: Mapped[str] = mapped_column(String(64), unique=True)
    # Provider credentials are sent as-is, so they cannot be hashed: stored encrypted
    # (Fernet, ingest.secrets) and decrypted only where used. The API key goes only to the
    # provider's own hosts; the app secret checks X-Hub-Signature-256 (None: no signature).
    api_key_encrypted: Mapped[str] = mapped_column(Text)
    app_secret_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Meta's subscription handshake only compares the verify token: its SHA-256 is enough.
    verify_token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # 360dialog cannot sign with Meta's secret: it may send a shared secret in a header of
    # our choosing. Only its SHA-256 is stored.
    webhook_secret_header: Mapped[str | None] = mapped_column(String(100), nullable=True)
    webhook_secret_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # An instance with neither an app secret nor a shared secret takes webhooks only if the
    # operator said so (`--allow-unsigned-webhooks`): anyone who reaches the service could
    # then have it download with the instance's key. Never true beside a configured check.
    allow_unsigned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    connected: Mapped[bool] = mapped_column(Boolean, default=True)
    # Why and when the instance was last marked disconnected (by a worker that met a 401, or
    # by the operator); both cleared when it is connected again.
    disconnected_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    disconnected_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Stored media older than this many days (from receipt) is deleted and its row marked
    # purged; None keeps everything.
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Where downstream hears of stored, failed and expired items (ingest.callbacks), and the
    # Standard Webhooks secret that signs each event, encrypted like the API key.
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_secret_encrypted: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    account: Mapped[Account] = relationship(back_populates="instances")

    __table_args__ = (CheckConstraint("provider IN ('cloud', '360dialog')", name="provider"),)


class ApiToken(Base):
    """An archive API token: account scope (every instance) or instance scope (one)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id"), nullable=True, index=True
    )
    instance_id: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id"), nullable=True, index=True
    )
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The archive API's limit for this token in ``limits`` notation ("1000/minute"); None
    # means the deployment's INGEST_API_RATE_LIMIT.
    rate_limit: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("(account_id IS NULL) <> (instance_id IS NULL)", name="exactly_one_scope"),
    )


# Pending rows whose wake-up was never published: what the relay takes (ingest.wake_relay).
UNWOKEN_ROWS = "state = 'pending' AND enqueued_at IS NULL"


class MediaItem(Base):
    """One inbound media message and everything known about archiving it."""

    __tablename__ = "media_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    message_id: Mapped[str] = mapped_column(String(255))  # wamid
    media_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    media_type: Mapped[str] = mapped_column(String(20))

    declared_mime: Mapped[str | None] = mapped_column(String(255), nullable=True)
    actual_mime: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Both normalised to lowercase hex, whatever encoding the provider used.
    declared_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actual_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    declared_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    filename: Mapped[str | None] = mapped_column(Text, nullable=True)
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    sender: Mapped[str | None] = mapped_column(String(64), nullable=True)
    voice: Mapped[bool] = mapped_column(Boolean, default=False)
    animated: Mapped[bool] = mapped_column(Boolean, default=False)
    # Over the provider's per-type *sending* limit: archived anyway, flagged for downstream.
    over_send_limit: Mapped[bool] = mapped_column(Boolean, default=False)

    message_timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The signed direct-download URL from the webhook. Confidential: cleared once used or
    # stale, never logged.
    download_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    url_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    state: Mapped[str] = mapped_column(String(20), default=MediaState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that ended with the lease running out (worker lost): capped, see reconciler.
    lease_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When a wake-up was last published; empty until the relay publishes one. The reconciler
    # re-publishes only rows whose last wake-up is old, so a backlog does not fill the queue
    # with duplicates.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(String(50), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    storage_backend: Mapped[str | None] = mapped_column(String(20), nullable=True)
    storage_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    stored_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Purged or erased: when the bytes went and on whose word ("retention: 30 days", the
    # erasing token's label, the operator at the command line).
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    removed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    instance: Mapped[Instance] = relationship()

    __table_args__ = (
        UniqueConstraint("instance_id", "message_id", name="uq_media_items_instance_message"),
        Index("ix_media_items_state_next_attempt", "state", "next_attempt_at"),
        Index("ix_media_items_state_lease", "state", "lease_until"),
        CheckConstraint(
            "state IN ('pending', 'downloading', 'stored', 'failed', 'expired', 'purged', "
            "'erased')",
            name="state",
        ),
        # The retention pass: stored rows by age.
        Index("ix_media_items_state_received", "state", "received_at"),
        # The wake-up relay: rows committed by the receiver and not yet published
        # (ingest.wake_relay), a handful of entries whatever the backlog.
        Index(
            "ix_media_items_unwoken",
            "id",
            postgresql_where=text(UNWOKEN_ROWS),
            sqlite_where=text(UNWOKEN_ROWS),
        ),
    )


class CallbackEvent(Base):
    """One event for an instance's callback URL, written in the transaction that changed the
    row (an outbox): a state change is never announced twice or lost between the two.

    ``body`` is the exact JSON sent, signed at each attempt with a fresh timestamp; the
    receiver deduplicates on ``event_id`` (the ``webhook-id`` header).
    """

    __tablename__ = "callback_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    media_item_id: Mapped[int] = mapped_column(ForeignKey("media_items.id"), index=True)
    event_type: Mapped[str] = mapped_column(String(40))
    body: Mapped[str] = mapped_column(Text)
    # pending (to be sent, again after a failure), delivered, or failed (gave up).
    state: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A sender holds the event until then; past it, another may send it again.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_callback_events_state_next_attempt", "state", "next_attempt_at"),
        CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state"),
    )


class ErrorBudgetEvent(Base):
    """A provider error (or a call in flight that may become one) counted against a budget.

    Used by the SQL-backed error budget when no Redis is configured.
    """

    __tablename__ = "error_budget_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    budget_key: Mapped[str] = mapped_column(String(200), index=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # False while the call is in flight (a reservation), True once it was an error.
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiRateHit(Base):
    """One archive API request counted against its token's moving window.

    Used by the SQL-backed rate limit when no Redis is configured, so that every web process
    of a deployment shares one window per token.
    """

    __tablename__ = "api_rate_hits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The token's hash and its limit (``limits``' key), never the token itself.
    rate_key: Mapped[str] = mapped_column(String(200))
    hit_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the hit leaves its window: what the prune of quiet tokens' hits goes by, whatever
    # each token's period.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    __table_args__ = (Index("ix_api_rate_hits_key_hit_at", "rate_key", "hit_at"),)


class MaintenanceTurn(Base):
    """Whose turn it is to run a deployment-wide periodic job (the reconciler), and until when.

    Every worker process offers to run the reconciler; the one whose conditional UPDATE moves
    ``until`` forward runs it, the others skip that period. Beat is then a convenience: with
    it dead, or with two of them, the pass still runs about once per interval.
    """

    __tablename__ = "maintenance_turns"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime)
