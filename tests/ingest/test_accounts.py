import hashlib

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from ingest import accounts
from ingest.models import ApiToken, Instance, Provider
from ingest.secrets import SecretBox, SecretKeyError, generate_key
from tests.factories import box_for_session, make_instance


def test_instance_add_uses_the_default_account(session: Session) -> None:
    instance = make_instance(session, name="shop")
    assert instance.account.name == accounts.DEFAULT_ACCOUNT
    assert instance.connected is True


@pytest.mark.parametrize("clash", ["name", "phone_number_id"])
def test_instance_names_and_phone_numbers_are_unique(session: Session, clash: str) -> None:
    make_instance(session, name="shop", phone_number_id="111")
    duplicate = {
        "name": "other",
        "phone_number_id": "222",
        clash: {"name": "shop", "phone_number_id": "111"}[clash],
    }
    with pytest.raises(accounts.RegistryError):
        make_instance(session, **duplicate)


def test_unknown_account_is_a_registry_error(session: Session) -> None:
    with pytest.raises(accounts.RegistryError, match="no account"):
        make_instance(session, account="nobody")


def test_webhook_secret_needs_header_and_value(session: Session) -> None:
    with pytest.raises(accounts.RegistryError):
        make_instance(session, provider=Provider.D360, webhook_secret_header="X-Secret")


def test_webhook_secret_is_stored_hashed(session: Session) -> None:
    instance = make_instance(
        session,
        provider=Provider.D360,
        webhook_secret_header="X-Secret",
        webhook_secret="s3cret",
    )
    assert instance.webhook_secret_hash != "s3cret"
    assert instance.webhook_secret_hash is not None
    assert accounts.secret_matches("s3cret", instance.webhook_secret_hash)
    assert not accounts.secret_matches("s3cret!", instance.webhook_secret_hash)


def test_tokens_are_stored_only_as_hashes(session: Session) -> None:
    make_instance(session, name="shop")
    token = accounts.create_token(session, instance="shop")
    stored = session.scalars(select(ApiToken.token_hash)).all()
    assert stored == [accounts.hash_secret(token)]
    assert token not in stored


def test_a_token_has_exactly_one_scope(session: Session) -> None:
    make_instance(session, name="shop")
    with pytest.raises(accounts.RegistryError):
        accounts.create_token(session, instance="shop", account="default")
    with pytest.raises(accounts.RegistryError):
        accounts.create_token(session)


def test_disconnect_and_connect(session: Session) -> None:
    make_instance(session, name="shop")
    accounts.set_connected(session, "shop", False)
    assert session.scalar(select(Instance.connected).where(Instance.name == "shop")) is False
    accounts.set_connected(session, "shop", True)
    assert session.scalar(select(Instance.connected).where(Instance.name == "shop")) is True


@pytest.mark.parametrize(
    "name", ["shop", "a", "demo-0a1b2c3d4e", "loja.sp_01", "Shop-2", "x" * 100, "1.2"]
)
def test_plain_instance_names_are_accepted(session: Session, name: str) -> None:
    assert make_instance(session, name=name).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".shop",
        "..",
        "_shop",
        "-shop",
        "a/b",
        "a\\b",
        "my shop",
        "shop\n",
        "tab\tname",
        "nul\x00",
        "lojá",
        "x" * 101,
    ],
)
def test_instance_names_that_break_urls_or_keys_are_refused(session: Session, name: str) -> None:
    with pytest.raises(accounts.RegistryError, match="invalid instance name"):
        make_instance(session, name=name)
    # Counted, not looked up by name: PostgreSQL refuses a NUL in a query parameter.
    assert session.scalars(select(Instance)).all() == []


def test_disconnect_records_why_and_when_and_connect_clears_both(session: Session) -> None:
    make_instance(session, name="shop")
    instance = accounts.set_connected(session, "shop", False)
    assert instance.disconnected_reason == "operator"
    assert instance.disconnected_at is not None
    instance = accounts.set_connected(session, "shop", True)
    assert (instance.connected, instance.disconnected_reason, instance.disconnected_at) == (
        True,
        None,
        None,
    )


@pytest.mark.parametrize("name", ["acme", "default-2", "a.b_c"])
def test_plain_account_names_are_accepted(session: Session, name: str) -> None:
    assert accounts.add_account(session, name).name == name


@pytest.mark.parametrize("name", ["", ".acme", "a/b", "my account", "acmé", "x" * 101])
def test_account_names_follow_the_instance_name_rule(session: Session, name: str) -> None:
    with pytest.raises(accounts.RegistryError, match="invalid account name"):
        accounts.add_account(session, name)


def test_a_token_keeps_its_own_rate_limit(session: Session) -> None:
    make_instance(session, name="shop")
    accounts.create_token(session, instance="shop", rate_limit=" 1000/minute ")
    accounts.create_token(session, instance="shop")
    stored = session.scalars(select(ApiToken.rate_limit).order_by(ApiToken.id)).all()
    assert stored == ["1000/minute", None]


@pytest.mark.parametrize("bad", ["fast", "0/minute", "1/second;10/minute"])
def test_a_bad_rate_limit_is_refused_before_anything_is_stored(session: Session, bad: str) -> None:
    make_instance(session, name="shop")
    with pytest.raises(accounts.RegistryError, match="rate limit"):
        accounts.create_token(session, instance="shop", rate_limit=bad)
    assert session.scalars(select(ApiToken)).all() == []


def test_tokens_are_listed_by_what_they_reach_and_revoked_by_id(session: Session) -> None:
    accounts.add_account(session, "acme")
    shop = make_instance(session, name="shop")
    make_instance(session, name="store", account="acme")
    accounts.create_token(session, instance="shop", label="shop's")
    accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT, label="default's")
    accounts.create_token(session, instance="store", label="store's")
    accounts.create_token(session, account="acme", label="acme's", rate_limit="5/second")

    def labels(**scope: str) -> list[str | None]:
        return [t.label for t in accounts.list_tokens(session, **scope)]

    assert labels() == ["shop's", "default's", "store's", "acme's"]
    assert labels(instance="shop") == ["shop's", "default's"]
    assert labels(account="acme") == ["store's", "acme's"]
    listed = accounts.list_tokens(session, account="acme")
    assert [(t.scope, t.rate_limit) for t in listed] == [
        ("instance store", None),
        ("account acme", "5/second"),
    ]
    with pytest.raises(accounts.RegistryError, match="no instance"):
        accounts.list_tokens(session, instance="nowhere")

    revoked = accounts.revoke_token(session, listed[0].id)
    assert revoked.label == "store's"
    assert labels(account="acme") == ["acme's"]
    with pytest.raises(accounts.RegistryError, match=f"no token with id {listed[0].id}"):
        accounts.revoke_token(session, listed[0].id)
    assert shop.id  # the instance itself is untouched


# --- webhook authentication and secrets at rest (issue 14) ---------------------------------


def _spec(**overrides: object) -> accounts.InstanceSpec:
    values: dict[str, object] = {
        "name": "shop",
        "provider": Provider.CLOUD,
        "phone_number_id": "111",
        "api_key": "EAAG-provider-key",
    }
    values.update(overrides)
    return accounts.InstanceSpec(**values)  # type: ignore[arg-type]


def test_an_instance_without_webhook_auth_is_refused_unless_allowed_by_name(
    session: Session,
) -> None:
    box = box_for_session(session)
    with pytest.raises(accounts.RegistryError, match="would take webhooks from anyone"):
        accounts.add_instance(session, _spec(), box)
    assert session.scalars(select(Instance)).all() == []

    accounts.add_instance(session, _spec(allow_unsigned=True), box)
    accounts.add_instance(session, _spec(name="signed", phone_number_id="2", app_secret="a"), box)
    accounts.add_instance(
        session,
        _spec(
            name="d360",
            phone_number_id="3",
            provider=Provider.D360,
            webhook_secret_header="X-S",
            webhook_secret="s",
        ),
        box,
    )
    assert accounts.unsigned_instances(session) == ["shop"]


def test_allowing_unsigned_webhooks_beside_a_check_is_refused(session: Session) -> None:
    # Both would read as "accepts unsigned" in a listing while the receiver refuses them.
    with pytest.raises(accounts.RegistryError, match="nothing to allow"):
        accounts.add_instance(
            session, _spec(app_secret="a", allow_unsigned=True), box_for_session(session)
        )


def test_secrets_are_stored_encrypted_or_hashed_never_in_clear(session: Session) -> None:
    box = box_for_session(session)
    accounts.add_instance(
        session,
        _spec(
            app_secret="meta-app-secret",
            verify_token="verify-me-please",
            webhook_secret_header="X-Shared",
            webhook_secret="shared-secret",
        ),
        box,
    )
    session.commit()
    raw = session.execute(text("SELECT * FROM instances")).one()
    stored = " ".join(str(value) for value in raw)
    for secret in ("EAAG-provider-key", "meta-app-secret", "verify-me-please", "shared-secret"):
        assert secret not in stored

    row = accounts.get_instance(session, "shop")
    assert box.decrypt(row.api_key_encrypted) == "EAAG-provider-key"
    assert row.app_secret_encrypted is not None
    assert box.decrypt(row.app_secret_encrypted) == "meta-app-secret"
    assert row.verify_token_hash == hashlib.sha256(b"verify-me-please").hexdigest()
    with pytest.raises(SecretKeyError):
        SecretBox([generate_key()]).decrypt(row.api_key_encrypted)


def test_update_changes_only_the_secrets_given(session: Session) -> None:
    box = box_for_session(session)
    make_instance(session, name="shop", api_key="old-key", app_secret="old-app", verify_token="v1")
    before = accounts.get_instance(session, "shop")
    app_before, verify_before = before.app_secret_encrypted, before.verify_token_hash

    accounts.update_instance(session, "shop", accounts.InstanceUpdate(api_key="new-key"), box)
    row = accounts.get_instance(session, "shop")
    assert box.decrypt(row.api_key_encrypted) == "new-key"
    assert (row.app_secret_encrypted, row.verify_token_hash) == (app_before, verify_before)

    accounts.update_instance(
        session,
        "shop",
        accounts.InstanceUpdate(app_secret="new-app", verify_token="v2"),
        box,
    )
    assert row.app_secret_encrypted is not None
    assert box.decrypt(row.app_secret_encrypted) == "new-app"
    assert row.verify_token_hash == accounts.hash_secret("v2")
    assert box.decrypt(row.api_key_encrypted) == "new-key"
    with pytest.raises(accounts.RegistryError, match="no instance named"):
        accounts.update_instance(session, "ghost", accounts.InstanceUpdate(api_key="k"), box)
    with pytest.raises(accounts.RegistryError, match="empty"):
        accounts.update_instance(session, "shop", accounts.InstanceUpdate(api_key=""), box)


def test_update_never_leaves_an_instance_taking_webhooks_silently_unchecked(
    session: Session,
) -> None:
    box = box_for_session(session)
    make_instance(session, name="open", app_secret=None)  # allowed unsigned, by name
    require = accounts.InstanceUpdate(allow_unsigned=False)
    with pytest.raises(accounts.RegistryError, match="would take webhooks from anyone"):
        accounts.update_instance(session, "open", require, box)
    assert accounts.unsigned_instances(session) == ["open"]

    # Giving it a check withdraws the consent, which then has no object.
    accounts.update_instance(
        session,
        "open",
        accounts.InstanceUpdate(webhook_secret_header="X-S", webhook_secret="s"),
        box,
    )
    assert accounts.get_instance(session, "open").allow_unsigned is False
    assert accounts.unsigned_instances(session) == []
    with pytest.raises(accounts.RegistryError, match="nothing to allow"):
        accounts.update_instance(session, "open", accounts.InstanceUpdate(allow_unsigned=True), box)
    with pytest.raises(accounts.RegistryError, match="needs a header"):
        make_instance(session, name="signed")
        accounts.update_instance(
            session, "signed", accounts.InstanceUpdate(webhook_secret="s"), box
        )


def test_rotate_re_encrypts_every_secret_with_the_first_key(session: Session) -> None:
    old, new = generate_key(), generate_key()
    old_box = SecretBox([old])
    make_instance(session, name="a", box=old_box, api_key="key-a", app_secret="app-a")
    make_instance(session, name="b", box=old_box, api_key="key-b", app_secret=None)

    assert accounts.rotate_secrets(session, SecretBox([new, old])) == 3
    only_new = SecretBox([new])
    a, b = accounts.get_instance(session, "a"), accounts.get_instance(session, "b")
    assert a.app_secret_encrypted is not None
    assert only_new.decrypt(a.api_key_encrypted) == "key-a"
    assert only_new.decrypt(a.app_secret_encrypted) == "app-a"
    assert only_new.decrypt(b.api_key_encrypted) == "key-b"
    assert b.app_secret_encrypted is None

    # A secret no key can read stops the rotation with a one-line error naming the variable.
    with pytest.raises(SecretKeyError, match="INGEST_SECRET_KEY"):
        accounts.rotate_secrets(session, SecretBox([generate_key()]))
