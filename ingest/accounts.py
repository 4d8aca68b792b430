"""Accounts, instances and archive API tokens: the operator-facing registry."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from ingest.db import row_count
from ingest.media_rows import delete_with_instance
from ingest.models import Account, ApiToken, CallbackEvent, Instance, MediaItem, Provider, utcnow
from ingest.rate_limit import parse_limit
from ingest.secrets import SecretBox
from ingest.storage import Storage

DEFAULT_ACCOUNT = "default"

# The name is a URL path segment (/webhook/<name>, /api/chat/base64/<name>) and the first
# part of every object key: no "/", whitespace or control characters, no leading dot.
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
INSTANCE_NAME_RULE = (
    "1 to 100 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
)
# What `ingest instance disconnect` records as the reason; a worker records its outcome code.
OPERATOR_DISCONNECT = "operator"


class RegistryError(Exception):
    """An operator asked for something that cannot be done (unknown name, duplicate...)."""


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def secret_matches(value: str, expected_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(value), expected_hash)


def check_account_name(name: str) -> str:
    # Same rule as instances: the names sit side by side in the CLI, logs and listings.
    if INSTANCE_NAME.fullmatch(name) is None:
        raise RegistryError(f"invalid account name {name!r}: use {INSTANCE_NAME_RULE}")
    return name


def add_account(session: Session, name: str) -> Account:
    check_account_name(name)
    if session.scalar(select(Account).where(Account.name == name)) is not None:
        raise RegistryError(f"account {name!r} already exists")
    account = Account(name=name)
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise RegistryError(f"no account named {name!r}")
    return account


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    provider: Provider
    phone_number_id: str
    api_key: str
    app_secret: str | None = None
    verify_token: str | None = None
    webhook_secret_header: str | None = None
    webhook_secret: str | None = None
    account: str = DEFAULT_ACCOUNT
    # Take webhooks that carry neither check: only when the operator asks for it by name.
    allow_unsigned: bool = False


def check_instance_name(name: str) -> str:
    if INSTANCE_NAME.fullmatch(name) is None:
        raise RegistryError(f"invalid instance name {name!r}: use {INSTANCE_NAME_RULE}")
    return name


UNSIGNED_REFUSED = (
    "would take webhooks from anyone: give it an app secret (Meta's X-Hub-Signature-256) or "
    "a webhook secret header and value (360dialog), or allow unsigned webhooks explicitly"
)


def add_instance(session: Session, spec: InstanceSpec, box: SecretBox) -> Instance:
    """Register a number. ``box`` encrypts its API key and app secret; the verify token and
    the shared webhook secret are stored as hashes."""
    check_instance_name(spec.name)
    account = get_account(session, spec.account)
    if session.scalar(select(Instance).where(Instance.name == spec.name)) is not None:
        raise RegistryError(f"instance {spec.name!r} already exists")
    clash = session.scalar(select(Instance).where(Instance.phone_number_id == spec.phone_number_id))
    if clash is not None:
        raise RegistryError(
            f"phone number id {spec.phone_number_id!r} already belongs to {clash.name!r}"
        )
    if (spec.webhook_secret_header is None) != (spec.webhook_secret is None):
        raise RegistryError("a webhook secret needs both its header name and its value")
    instance = Instance(
        account_id=account.id,
        name=spec.name,
        provider=str(spec.provider),
        phone_number_id=spec.phone_number_id,
        connected=True,
    )
    _set_secrets(
        instance,
        InstanceUpdate(
            api_key=spec.api_key,
            app_secret=spec.app_secret,
            verify_token=spec.verify_token,
            webhook_secret_header=spec.webhook_secret_header,
            webhook_secret=spec.webhook_secret,
        ),
        box,
    )
    _check_webhook_auth(instance, allow_unsigned=spec.allow_unsigned)
    session.add(instance)
    session.flush()
    return instance


@dataclass(frozen=True)
class InstanceUpdate:
    """What ``instance update`` changes: only the fields that are not None."""

    api_key: str | None = None
    app_secret: str | None = None
    verify_token: str | None = None
    webhook_secret_header: str | None = None
    webhook_secret: str | None = None
    # True: accept webhooks without either check; False: require one.
    allow_unsigned: bool | None = None


def update_instance(
    session: Session, name: str, changes: InstanceUpdate, box: SecretBox
) -> Instance:
    """Replace the given secrets of NAME (rotation after a leak, a new app secret) and
    leave the others as they are. The receiver's cache sees the change within seconds."""
    instance = get_instance(session, name)
    if changes.webhook_secret is not None and not (
        changes.webhook_secret_header or instance.webhook_secret_header
    ):
        raise RegistryError("a webhook secret needs a header name to be sent in")
    if changes.webhook_secret_header is not None and not (
        changes.webhook_secret or instance.webhook_secret_hash
    ):
        raise RegistryError("a webhook secret header needs the secret it carries")
    _set_secrets(instance, changes, box)
    allow_unsigned = instance.allow_unsigned
    if changes.allow_unsigned is not None:
        allow_unsigned = changes.allow_unsigned
    elif has_webhook_auth(instance):
        # A check was just configured: the consent to unsigned webhooks has no object left.
        allow_unsigned = False
    _check_webhook_auth(instance, allow_unsigned=allow_unsigned)
    session.flush()
    return instance


def _set_secrets(instance: Instance, changes: InstanceUpdate, box: SecretBox) -> None:
    for value, what in (
        (changes.api_key, "API key"),
        (changes.app_secret, "app secret"),
        (changes.verify_token, "verify token"),
        (changes.webhook_secret, "webhook secret"),
    ):
        if value is not None and not value:
            raise RegistryError(f"an empty {what} is no secret")
    if changes.api_key is not None:
        instance.api_key_encrypted = box.encrypt(changes.api_key)
    if changes.app_secret is not None:
        instance.app_secret_encrypted = box.encrypt(changes.app_secret)
    if changes.verify_token is not None:
        instance.verify_token_hash = hash_secret(changes.verify_token)
    if changes.webhook_secret_header is not None:
        instance.webhook_secret_header = changes.webhook_secret_header
    if changes.webhook_secret is not None:
        instance.webhook_secret_hash = hash_secret(changes.webhook_secret)


def _check_webhook_auth(instance: Instance, *, allow_unsigned: bool) -> None:
    if has_webhook_auth(instance):
        if allow_unsigned:
            raise RegistryError(
                f"instance {instance.name!r} authenticates its webhooks: unsigned ones would "
                "still be refused, so there is nothing to allow"
            )
    elif not allow_unsigned:
        raise RegistryError(f"instance {instance.name!r} {UNSIGNED_REFUSED}")
    instance.allow_unsigned = allow_unsigned


def has_webhook_auth(instance: Instance) -> bool:
    """Does the instance check its webhooks (Meta's signature, or the shared secret)?"""
    return bool(
        instance.app_secret_encrypted
        or (instance.webhook_secret_header and instance.webhook_secret_hash)
    )


def unsigned_instances(session: Session) -> list[str]:
    """Names of the instances that take webhooks without any check (the operator allowed it),
    for a start-up warning: anyone who reaches the service can post for them."""
    return list(
        session.scalars(
            select(Instance.name)
            .where(Instance.allow_unsigned.is_(True))
            .where(Instance.app_secret_encrypted.is_(None))
            .where(
                Instance.webhook_secret_header.is_(None) | Instance.webhook_secret_hash.is_(None)
            )
            .order_by(Instance.name)
        )
    )


def rotate_secrets(session: Session, box: SecretBox) -> int:
    """Re-encrypt every stored API key and app secret with the box's first key; returns how
    many secrets were rewritten. A secret no key of the box can read stops it (nothing is
    written: the caller's transaction rolls back)."""
    rewritten = 0
    rows = session.scalars(select(Instance).order_by(Instance.id).with_for_update())
    for instance in rows:
        instance.api_key_encrypted = box.rotate(instance.api_key_encrypted)
        rewritten += 1
        if instance.app_secret_encrypted:
            instance.app_secret_encrypted = box.rotate(instance.app_secret_encrypted)
            rewritten += 1
        if instance.callback_secret_encrypted:
            instance.callback_secret_encrypted = box.rotate(instance.callback_secret_encrypted)
            rewritten += 1
    session.flush()
    return rewritten


def set_retention(session: Session, name: str, days: int | None) -> Instance:
    """Keep NAME's stored media ``days`` days from receipt (None: for ever). Takes effect at
    the next retention pass, for media already stored too."""
    if days is not None and days < 1:
        raise RegistryError("retention must be at least 1 day")
    instance = get_instance(session, name)
    instance.retention_days = days
    session.flush()
    return instance


def get_instance(session: Session, name: str) -> Instance:
    instance = find_instance(session, name)
    if instance is None:
        raise RegistryError(f"no instance named {name!r}")
    return instance


def find_instance(session: Session, name: str) -> Instance | None:
    return session.scalar(select(Instance).where(Instance.name == name))


def set_connected(session: Session, name: str, connected: bool) -> Instance:
    """The operator connects NAME (forgetting why it was disconnected) or disconnects it."""
    instance = get_instance(session, name)
    instance.connected = connected
    instance.disconnected_reason = None if connected else OPERATOR_DISCONNECT
    instance.disconnected_at = None if connected else utcnow()
    return instance


def list_instances(session: Session) -> list[Instance]:
    return list(session.scalars(select(Instance).order_by(Instance.name)))


@dataclass(frozen=True)
class RemovedInstance:
    name: str
    media_rows: int
    objects: int  # stored objects deleted from the object store
    tokens: int  # the instance's own tokens (an account token is left alone)


def remove_instance(
    session: Session, storage: Storage, name: str, *, purge: bool
) -> RemovedInstance:
    """Delete instance NAME, its own API tokens and, with ``purge``, its media rows and their
    stored objects. Without ``purge`` an instance that has media rows is refused.

    Objects go first, rows after (in the caller's transaction): a removal that fails half way
    leaves rows whose object is gone (the archive answers 404 for them) and can simply be run
    again, never objects that no row names. Meant for an instance whose rows are final: a
    worker still downloading one finds its row gone, and its copy is left unnamed.
    """
    instance = get_instance(session, name)
    media_rows = session.scalar(
        select(func.count()).select_from(MediaItem).where(MediaItem.instance_id == instance.id)
    )
    if media_rows and not purge:
        raise RegistryError(
            f"instance {name!r} has {media_rows} media row(s): remove them and their stored "
            "objects too (purge), or keep the instance"
        )
    keys = session.scalars(
        select(MediaItem.storage_key).where(
            MediaItem.instance_id == instance.id, MediaItem.storage_key.is_not(None)
        )
    ).all()
    for key in keys:
        if key is not None:
            storage.delete(key)
    session.execute(delete(CallbackEvent).where(CallbackEvent.instance_id == instance.id))
    delete_with_instance(session, instance.id)
    tokens = session.execute(delete(ApiToken).where(ApiToken.instance_id == instance.id))
    session.delete(instance)
    session.flush()
    return RemovedInstance(
        name=name,
        media_rows=media_rows or 0,
        objects=len(keys),
        tokens=row_count(tokens),
    )


def create_token(
    session: Session,
    *,
    instance: str | None = None,
    account: str | None = None,
    label: str | None = None,
    rate_limit: str | None = None,
) -> str:
    """Create an API token and return it in clear. Only its hash is stored: show it once.

    ``rate_limit`` ("1000/minute"): the archive API's limit for this token instead of the
    deployment's ``INGEST_API_RATE_LIMIT``.
    """
    if (instance is None) == (account is None):
        raise RegistryError("a token belongs to exactly one instance or one account")
    if rate_limit is not None:
        rate_limit = check_rate_limit(rate_limit)
    token = secrets.token_urlsafe(32)
    row = ApiToken(token_hash=hash_secret(token), label=label, rate_limit=rate_limit)
    if instance is not None:
        row.instance_id = get_instance(session, instance).id
    else:
        assert account is not None
        row.account_id = get_account(session, account).id
    session.add(row)
    session.flush()
    return token


def check_rate_limit(value: str) -> str:
    """``value`` stripped, if ``limits`` reads it as one positive limit."""
    try:
        parse_limit(value)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    return value.strip()


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never the token, nor its hash."""

    id: int
    label: str | None
    scope: str  # "instance <name>" or "account <name>"
    created_at: datetime
    rate_limit: str | None  # None: the deployment's


def list_tokens(
    session: Session, *, instance: str | None = None, account: str | None = None
) -> list[TokenInfo]:
    """Tokens in creation order. ``instance``: those that can read it (its own and its
    account's). ``account``: the account's own and its instances'."""
    query = (
        select(ApiToken, Instance.name, Account.name)
        .outerjoin(Instance, ApiToken.instance_id == Instance.id)
        .outerjoin(Account, ApiToken.account_id == Account.id)
        .order_by(ApiToken.id)
    )
    if instance is not None:
        target = get_instance(session, instance)
        query = query.where(
            or_(ApiToken.instance_id == target.id, ApiToken.account_id == target.account_id)
        )
    if account is not None:
        owner = get_account(session, account)
        query = query.where(or_(ApiToken.account_id == owner.id, Instance.account_id == owner.id))
    return [
        TokenInfo(
            id=row.id,
            label=row.label,
            scope=f"instance {instance_name}" if instance_name else f"account {account_name}",
            created_at=row.created_at,
            rate_limit=row.rate_limit,
        )
        for row, instance_name, account_name in session.execute(query)
    ]


def revoke_token(session: Session, token_id: int) -> ApiToken:
    """Delete the token: the archive API refuses it from the next request on."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise RegistryError(f"no token with id {token_id}")
    session.delete(row)
    session.flush()
    return row
