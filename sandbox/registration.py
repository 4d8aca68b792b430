"""A throwaway instance for sandbox traffic: registered in the service's database with unique
names, credentials of its own and an instance token, then removed with everything it left.

``ingest demo``, end-to-end tests and benchmarks register one, tell the sandbox its phone
number id and API key (:meth:`sandbox.client.SandboxControl.add_number`) and post webhooks
for it (:meth:`DemoRegistration.webhook_route`).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from ingest import accounts
from ingest.db import make_engine, make_session_factory, session_scope
from ingest.models import ApiToken, Provider
from ingest.secrets import secret_box
from ingest.settings import Settings
from ingest.storage import storage_from_settings
from sandbox.payloads import sign

SECRET_HEADER = "X-Demo-Webhook-Secret"  # noqa: S105 - a header name, not a secret


@dataclass
class DemoRegistration:
    instance: str
    phone_number_id: str
    api_key: str
    token: str
    app_secret: str | None
    webhook_secret: str | None

    def webhook_route(self, body: bytes) -> tuple[str, dict[str, str]]:
        """The path to post ``body`` to and the headers that authenticate it, as the
        instance's provider sends them: Meta's signature, or 360dialog's shared secret."""
        headers = {"Content-Type": "application/json"}
        if self.app_secret:
            headers["X-Hub-Signature-256"] = sign(body, self.app_secret)
            return "/webhook", headers
        assert self.webhook_secret is not None
        headers[SECRET_HEADER] = self.webhook_secret
        return f"/webhook/{self.instance}", headers


def register(
    settings: Settings, provider: Provider, *, rate_limit: str | None = None
) -> DemoRegistration:
    """A throwaway instance (unique names) and an instance token, in the service's database.

    ``rate_limit``: the token's own archive API limit (default: the deployment's).
    """
    suffix = uuid.uuid4().hex[:10]
    api_key = secrets.token_urlsafe(24)
    app_secret = secrets.token_urlsafe(24) if provider is Provider.CLOUD else None
    # 360dialog cannot sign with Meta's secret: a shared-secret header stands in.
    webhook_secret = secrets.token_urlsafe(24) if provider is Provider.D360 else None
    spec = accounts.InstanceSpec(
        name=f"demo-{suffix}",
        provider=provider,
        phone_number_id=f"9{int(suffix, 16) % 10**14:014d}",
        api_key=api_key,
        app_secret=app_secret,
        webhook_secret_header=SECRET_HEADER if webhook_secret else None,
        webhook_secret=webhook_secret,
    )
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            try:
                accounts.get_account(session, accounts.DEFAULT_ACCOUNT)
            except accounts.RegistryError:
                accounts.add_account(session, accounts.DEFAULT_ACCOUNT)
            accounts.add_instance(session, spec, secret_box(settings))
            token = accounts.create_token(
                session, instance=spec.name, label="ingest demo", rate_limit=rate_limit
            )
    finally:
        engine.dispose()
    return DemoRegistration(
        spec.name, spec.phone_number_id, api_key, token, app_secret, webhook_secret
    )


def remove_registration(settings: Settings, reg: DemoRegistration) -> accounts.RemovedInstance:
    """Revoke the demo's token, then delete its instance with its rows and stored objects."""
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            token_id = session.scalar(
                select(ApiToken.id).where(ApiToken.token_hash == accounts.hash_secret(reg.token))
            )
            if token_id is not None:
                accounts.revoke_token(session, token_id)
            return accounts.remove_instance(
                session, storage_from_settings(settings), reg.instance, purge=True
            )
    finally:
        engine.dispose()
