"""provider secrets at rest: API keys and app secrets encrypted, verify tokens hashed; the
operator's explicit consent to unsigned webhooks

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-15

Existing rows are converted in the same transaction: verify tokens are hashed (no key
needed), API keys and app secrets are encrypted with the key of ``ingest.secrets`` for this
database (``INGEST_SECRET_KEY``, or with SQLite the key generated beside the database file).
On a server database without ``INGEST_SECRET_KEY`` that holds instances, the migration stops
before changing anything: set the key the service will run with and upgrade again. A database
without instances needs no key.

Instances that existed before have ``allow_unsigned`` false: one that had neither an app
secret nor a shared secret has its webhooks refused until the operator gives it one (or
allows unsigned webhooks explicitly) with ``ingest instance update``.

Downgrade decrypts API keys and app secrets back (the key is needed again); verify tokens
cannot be recovered from their hashes and come back empty.
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from ingest.secrets import SecretBox, environment_secret_box

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _box(bind: sa.Connection) -> SecretBox:
    # A caller may hand its own box over (tests); otherwise the environment decides, as it
    # does for the service that runs on this database.
    given = context.config.attributes.get("secret_box")
    if isinstance(given, SecretBox):
        return given
    return environment_secret_box(bind.engine.url.render_as_string(hide_password=False))


def upgrade() -> None:
    op.add_column("instances", sa.Column("app_secret_encrypted", sa.Text(), nullable=True))
    op.add_column("instances", sa.Column("verify_token_hash", sa.String(length=64), nullable=True))
    op.add_column(
        "instances",
        sa.Column("allow_unsigned", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    # Renamed in place rather than added: the column is NOT NULL, and on SQLite a new NOT
    # NULL column would need a table rebuild, refused while other tables refer to instances.
    op.alter_column("instances", "api_key", new_column_name="api_key_encrypted")

    bind = op.get_bind()
    instances = sa.table(
        "instances",
        sa.column("id", sa.Integer()),
        sa.column("api_key_encrypted", sa.Text()),
        sa.column("app_secret", sa.Text()),
        sa.column("app_secret_encrypted", sa.Text()),
        sa.column("verify_token", sa.Text()),
        sa.column("verify_token_hash", sa.String()),
    )
    rows = bind.execute(
        sa.select(
            instances.c.id,
            instances.c.api_key_encrypted,
            instances.c.app_secret,
            instances.c.verify_token,
        )
    ).all()
    box = _box(bind) if rows else None
    for row in rows:
        assert box is not None
        bind.execute(
            instances.update()
            .where(instances.c.id == row.id)
            .values(
                api_key_encrypted=box.encrypt(row.api_key_encrypted),
                app_secret_encrypted=(box.encrypt(row.app_secret) if row.app_secret else None),
                verify_token_hash=(
                    hashlib.sha256(row.verify_token.encode()).hexdigest()
                    if row.verify_token
                    else None
                ),
            )
        )
    # Plain DROP COLUMN (SQLite 3.35+), not batch mode: see 0004.
    op.drop_column("instances", "verify_token")
    op.drop_column("instances", "app_secret")


def downgrade() -> None:
    op.add_column("instances", sa.Column("app_secret", sa.Text(), nullable=True))
    op.add_column("instances", sa.Column("verify_token", sa.Text(), nullable=True))
    op.alter_column("instances", "api_key_encrypted", new_column_name="api_key")

    bind = op.get_bind()
    instances = sa.table(
        "instances",
        sa.column("id", sa.Integer()),
        sa.column("api_key", sa.Text()),
        sa.column("app_secret", sa.Text()),
        sa.column("app_secret_encrypted", sa.Text()),
    )
    rows = bind.execute(
        sa.select(instances.c.id, instances.c.api_key, instances.c.app_secret_encrypted)
    ).all()
    box = _box(bind) if rows else None
    for row in rows:
        assert box is not None
        bind.execute(
            instances.update()
            .where(instances.c.id == row.id)
            .values(
                api_key=box.decrypt(row.api_key),
                app_secret=(
                    box.decrypt(row.app_secret_encrypted) if row.app_secret_encrypted else None
                ),
            )
        )
    op.drop_column("instances", "allow_unsigned")
    op.drop_column("instances", "verify_token_hash")
    op.drop_column("instances", "app_secret_encrypted")
