"""`DELETE /api/chat/media/<instance>?messageId=`: a right-to-erasure request over HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from ingest import accounts, archive
from ingest.models import MediaItem, MediaState
from ingest.services import Services
from ingest.storage import StorageError
from tests.webhook.test_archive_api import Archive, b64_path, build_archive


@pytest.fixture
def api(services: Services) -> Archive:
    return build_archive(services)


def _erase(api: Archive, instance: str, message_id: str, token: str | None) -> Any:
    headers = {"token": token} if token is not None else {}
    return api.client.delete(f"/api/chat/media/{instance}?messageId={message_id}", headers=headers)


def _row(api: Archive, message_id: str) -> MediaItem:
    with api.services.sessions() as session:
        row = session.scalar(select(MediaItem).where(MediaItem.message_id == message_id))
        assert row is not None
        return row


def test_an_account_token_erases_the_object_and_the_row_says_who_and_when(api: Archive) -> None:
    message_id = api.store()
    key = _row(api, message_id).storage_key
    assert key is not None

    answer = _erase(api, api.instance, message_id, api.account_token)

    assert answer.status_code == 200, answer.get_data(as_text=True)
    body = answer.get_json()
    assert body["success"] is True and body["message"] == archive.ERASED
    assert body["message_id"] == message_id
    assert body["erased_by"].startswith("token ")
    assert api.account_token not in body["erased_by"]
    with pytest.raises(FileNotFoundError):
        api.services.storage.head(key)
    row = _row(api, message_id)
    assert row.state == MediaState.ERASED
    assert row.removed_by == body["erased_by"]
    # Nothing is served any more: the contract's not-found, on every reading route.
    for path in (
        b64_path(api.instance, message_id),
        f"/api/chat/media/{api.instance}?messageId={message_id}",
    ):
        gone = api.get(path, api.account_token)
        assert gone.status_code == 404
        assert gone.get_json() == {"success": False, "error": {"message": archive.NO_MEDIA}}
    found = api.get(
        f"/api/chat/find-message/{api.instance}?messageId={message_id}", api.account_token
    )
    assert found.get_json()["state"] == "erased"
    assert found.get_json()["removed_by"] == body["erased_by"]
    assert found.get_json()["caption"] is None


def test_erasure_is_idempotent(api: Archive) -> None:
    message_id = api.store()
    first = _erase(api, api.instance, message_id, api.account_token).get_json()
    again = _erase(api, api.instance, message_id, api.account_token)
    assert again.status_code == 200
    assert again.get_json()["erased_at"] == first["erased_at"]


def test_an_instance_token_may_not_erase(api: Archive) -> None:
    message_id = api.store()
    answer = _erase(api, api.instance, message_id, api.instance_token)
    assert answer.status_code == 403
    assert answer.get_json() == {
        "success": False,
        "error": {"message": archive.ACCOUNT_TOKEN_REQUIRED},
    }
    assert _row(api, message_id).state == MediaState.STORED


@pytest.mark.parametrize(
    ("instance", "message_id", "token", "status", "message"),
    [
        ("", "m", "account", 400, archive.INSTANCE_REQUIRED),
        ("mine", "", "account", 400, archive.MESSAGE_ID_REQUIRED),
        ("mine", "m", None, 401, archive.INVALID_TOKEN),
        ("mine", "m", "not-a-token", 401, archive.INVALID_TOKEN),
        ("foreign", "m", "account", 404, archive.INSTANCE_NOT_FOUND),
        ("nobody", "m", "account", 404, archive.INSTANCE_NOT_FOUND),
        ("mine", "wamid.nothing", "account", 404, archive.NO_MEDIA),
    ],
)
def test_errors_come_in_the_contract_shape(
    api: Archive, instance: str, message_id: str, token: str | None, status: int, message: str
) -> None:
    name = {"mine": api.instance, "foreign": api.foreign}.get(instance, instance)
    given = api.account_token if token == "account" else token
    path = (
        f"/api/chat/media/{name}?messageId={message_id}"
        if name
        else f"/api/chat/media?messageId={message_id}"
    )
    answer = api.client.delete(path, headers={"token": given} if given else {})
    assert answer.status_code == status
    assert answer.get_json() == {"success": False, "error": {"message": message}}


def test_a_failing_store_answers_503_and_the_repeat_finishes(
    api: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = api.store()
    key = _row(api, message_id).storage_key
    assert key is not None
    real_delete = api.services.storage.delete

    def failing(_key: str) -> None:
        raise StorageError("store down")

    monkeypatch.setattr(api.services.storage, "delete", failing)
    answer = _erase(api, api.instance, message_id, api.account_token)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"]
    # Already erased: nothing is served while the object waits for the repeat.
    assert _row(api, message_id).state == MediaState.ERASED
    assert api.get(b64_path(api.instance, message_id), api.account_token).status_code == 404

    monkeypatch.setattr(api.services.storage, "delete", real_delete)
    assert _erase(api, api.instance, message_id, api.account_token).status_code == 200
    with pytest.raises(FileNotFoundError):
        api.services.storage.head(key)


def test_a_purged_item_is_the_contracts_not_found(api: Archive) -> None:
    message_id = api.store()
    with api.services.sessions.begin() as session:
        row = session.scalar(select(MediaItem).where(MediaItem.message_id == message_id))
        assert row is not None
        row.state = MediaState.PURGED
    answer = api.get(b64_path(api.instance, message_id), api.account_token)
    assert answer.status_code == 404
    assert answer.get_json() == {"success": False, "error": {"message": archive.NO_MEDIA}}


def test_the_token_label_names_who_erased(api: Archive) -> None:
    with api.services.sessions.begin() as session:
        labelled = accounts.create_token(
            session, account=accounts.DEFAULT_ACCOUNT, label="privacy desk"
        )
    message_id = api.store()
    body = _erase(api, api.instance, message_id, labelled).get_json()
    assert body["erased_by"].endswith("(privacy desk)")
