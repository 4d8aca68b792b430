"""The webhook parser on its own: bytes in, typed records out, PayloadError for the rest."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings

from ingest.events import (
    MAX_ID_CHARS,
    MediaEvent,
    PayloadError,
    ProviderFault,
    TooManyItems,
    has_control_character,
    is_attachment_url,
    parse_body,
    parse_payload,
)
from ingest.models import MediaType
from tests.webhook.conftest import (
    change,
    encode,
    envelope,
    json_values,
    media_message,
    status_update,
    text_message,
    webhook_documents,
)

# Meta's direct-download form (provider-media-constraints.md, "Download Media").
LOOKASIDE_URL = (
    "https://lookaside.fbsbx.com/whatsapp_business/attachments/"
    "?mid=130345565692730173924&source=getMedia&ext=1664537344507&hash=ATtBt0Cdio"
)


def only_event(document: Any) -> MediaEvent:
    (event,) = parse_payload(document).media
    return event


def test_multi_entry_body_yields_media_in_order_and_counts_the_rest() -> None:
    first = [media_message("image"), text_message(), media_message("sticker")]
    second = [media_message("document")]
    document = envelope(
        change("111", first, statuses=[status_update()]),
        change("222", second),
        change("111", None, statuses=[status_update(), status_update()]),
        entries=2,
    )
    parsed = parse_body(encode(document))
    assert [event.message_id for event in parsed.media] == [
        first[0]["id"],
        first[2]["id"],
        second[0]["id"],
    ]
    assert [event.phone_number_id for event in parsed.media] == ["111", "111", "222"]
    assert parsed.phone_number_ids == ("111", "222")
    assert parsed.ignored == 4  # one text message, three statuses
    assert parsed.unattached_faults == ()


@pytest.mark.parametrize("kind", list(MediaType))
def test_each_media_type_is_read_with_its_fields(kind: MediaType) -> None:
    message = media_message(
        kind.value,
        caption="hi",
        filename="f.bin",
        voice=True,
        animated=True,
        url=LOOKASIDE_URL,
        file_size=1234,
    )
    event = only_event(envelope(change("111", [message])))
    assert event.media_type is kind
    assert event.message_id == message["id"]
    assert event.media_id == message[kind.value]["id"]
    assert event.mime_type == message[kind.value]["mime_type"]
    assert event.sha256 == "a" * 64
    assert (event.caption, event.filename, event.voice, event.animated) == (
        "hi",
        "f.bin",
        True,
        True,
    )
    assert event.file_size == 1234
    assert event.sender == "15551234567"
    assert event.timestamp == datetime.fromtimestamp(int(message["timestamp"]), tz=UTC)
    assert event.url == LOOKASIDE_URL
    assert event.fault is None


def test_sha256_in_base64_is_normalised_and_garbage_is_dropped() -> None:
    digest = bytes(range(32))
    b64 = base64.b64encode(digest).decode()
    assert only_event(envelope(change("1", [media_message(sha256=b64)]))).sha256 == digest.hex()
    assert only_event(envelope(change("1", [media_message(sha256="not a hash")]))).sha256 is None


def test_signed_url_is_kept_out_of_repr() -> None:
    event = only_event(envelope(change("1", [media_message(url=LOOKASIDE_URL)])))
    assert event.url == LOOKASIDE_URL
    assert "ATtBt0Cdio" not in repr(event)


# --- media ids and URLs (issue 14: 1b, 1c) ------------------------------------------------


@pytest.mark.parametrize(
    "media_id",
    [
        "..",
        "../me",
        "1/2",
        "/1",
        "1?fields=x",
        "%2e%2e",
        "1.0",
        "-1",
        "abc",
        "1 2",
        "\uff11\uff12\uff13",  # fullwidth digits: decimal, not ASCII
        "1" * 65,
    ],
)
def test_a_media_id_is_digits_or_the_body_is_refused(media_id: str) -> None:
    # The worker looks the id up as GET /<version>/<media-id> with the instance's credential:
    # ".." or "a/b" there would be another endpoint of the provider's API.
    with pytest.raises(PayloadError, match=r"image\.id is not a media id"):
        parse_payload(envelope(change("1", [media_message("image", id=media_id)])))


def test_a_fault_message_s_media_id_is_checked_too() -> None:
    message = media_message("document", id="../../x")
    message["errors"] = [{"code": 131052, "title": "Media file too large"}]
    with pytest.raises(PayloadError, match="not a media id"):
        parse_payload(envelope(change("1", [message])))


@pytest.mark.parametrize(
    "url",
    [
        LOOKASIDE_URL,
        # The sandbox's Cloud CDN: the same path on the Graph stand-in's own origin.
        "http://127.0.0.1:8090/whatsapp_business/attachments/?mid=1&source=getMedia&ext=2&hash=h",
        # 360dialog's rewrite onto its host (no base path in production).
        "https://waba-v2.360dialog.io/whatsapp_business/attachments/?mid=1&ext=2&hash=h",
        # Slashes escaped twice (a literal backslash survives json.loads): undone.
        "https:\\/\\/lookaside.fbsbx.com\\/whatsapp_business\\/attachments\\/?mid=1&hash=h",
    ],
)
def test_cdn_attachment_urls_are_kept(url: str) -> None:
    parsed = parse_payload(envelope(change("1", [media_message(url=url)])))
    assert parsed.media[0].url == url  # stored as given; the worker undoes the escapes
    assert parsed.dropped_urls == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://graph.facebook.com/v21.0/me?fields=id,name",  # another endpoint, same token
        "https://graph.facebook.com/v21.0/130345565692730173924",
        "https://lookaside.fbsbx.com/x?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?ext=1&hash=h",  # no mid
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&mid=2",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=..",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/../x/?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/%2e%2e/?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/x/?mid=1",
        "https://user:pw@lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1#frag",
        "https://lookaside.fbsbx.com\\@evil.example/whatsapp_business/attachments/?mid=1",
        "https://lookaside.fbsbx.com:99999/whatsapp_business/attachments/?mid=1",
        "http://127.0.0.1:6379/",  # Redis, under `make run`'s old allowlist
        "http://127.0.0.1:8090/_sandbox/stats",
        "ftp://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1",
        "/whatsapp_business/attachments/?mid=1",
        "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&x=a b",
        "https://lookäside.fbsbx.com/whatsapp_business/attachments/?mid=1",
    ],
)
def test_other_urls_are_dropped_and_counted_so_the_media_id_is_resolved(url: str) -> None:
    parsed = parse_payload(envelope(change("1", [media_message(url=url)])))
    (event,) = parsed.media
    assert event.url is None
    assert event.media_id is not None  # what the worker resolves instead
    assert parsed.dropped_urls == 1


def test_attachment_url_under_a_base_path() -> None:
    # 360dialog's rewrite onto a base URL that has a path (the sandbox's /d360).
    url = "http://127.0.0.1:8090/d360/whatsapp_business/attachments/?mid=1&hash=h"
    assert is_attachment_url(url, base_path="/d360")
    assert is_attachment_url(url, base_path="/d360/")
    assert not is_attachment_url(url)
    assert not is_attachment_url(url.replace("/d360", ""), base_path="/d360")


# --- bounds (issue 14: 1d) ------------------------------------------------------------------


def test_media_items_over_the_bound_raise_too_many_items() -> None:
    messages = [media_message() for _ in range(11)]
    assert len(parse_payload(envelope(change("1", messages[:10])), max_items=10).media) == 10
    with pytest.raises(TooManyItems, match="more than 10 media items"):
        parse_payload(envelope(change("1", messages)), max_items=10)
    # Spread over changes and entries, they are counted all the same.
    spread = envelope(*(change("1", [m]) for m in messages), entries=3)
    with pytest.raises(TooManyItems):
        parse_payload(spread, max_items=10)
    assert len(parse_payload(spread).media) == 11  # no bound given: none applied


def test_distinct_phone_number_ids_over_the_bound_raise_too_many_items() -> None:
    ids = [str(100 + n) for n in range(11)]
    with pytest.raises(TooManyItems, match="more than 10 phone number ids"):
        parse_payload(envelope(*(change(pid, None) for pid in ids)), max_items=10)
    # The same id named again is one id.
    repeated = envelope(*(change("100", None) for _ in range(50)))
    assert parse_payload(repeated, max_items=10).phone_number_ids == ("100",)
    assert isinstance(TooManyItems("x"), PayloadError)


def test_the_bound_is_checked_while_parsing_not_after() -> None:
    # 1001 ids, the last one malformed: the bound stops the parse before reaching it.
    changes = [change(str(100 + n), None) for n in range(1001)]
    changes.append({"value": []})
    with pytest.raises(TooManyItems):
        parse_payload(envelope(*changes), max_items=1000)


def test_unsupported_media_message_becomes_a_fault_and_other_unsupported_are_ignored() -> None:
    media = {
        "id": "wamid.U1",
        "type": "unsupported",
        "unsupported": {"type": "video"},
        "errors": [
            {"code": 131051, "title": "Message type unknown", "error_data": {"details": "x"}}
        ],
    }
    poll = {"id": "wamid.U2", "type": "unsupported", "unsupported": {"type": "poll_creation"}}
    parsed = parse_payload(envelope(change("1", [media, poll])))
    (event,) = parsed.media
    assert event.media_type is MediaType.VIDEO
    assert event.fault == ProviderFault(code=131051, title="Message type unknown", details="x")
    assert event.fault.reason == "provider_error"
    assert event.fault.describe() == "131051: Message type unknown"
    assert parsed.ignored == 1


def test_media_message_with_errors_and_no_media_object_is_a_fault() -> None:
    message = {
        "id": "wamid.BIG",
        "type": "document",
        "errors": [{"code": "131052", "message": "File size exceeds the 100 MB limit"}],
    }
    event = only_event(envelope(change("1", [message])))
    assert event.fault is not None
    assert event.fault.code == 131052
    assert event.fault.reason == "too_large"
    assert event.media_id is None


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("Media file too large", "too_large"),
        ("Media size exceeds the limit", "too_large"),
        ("Message type unknown", "provider_error"),
        ("Media download error", "provider_error"),
    ],
)
def test_fault_reason_from_the_providers_words(title: str, reason: str) -> None:
    assert ProviderFault(code=1, title=title).reason == reason


def test_value_errors_attach_to_the_changes_messages_or_stay_unattached() -> None:
    errors = [{"code": 131000, "title": "Something went wrong"}]
    with_message = parse_payload(envelope(change("1", [media_message()], errors=errors)))
    assert with_message.media[0].fault == ProviderFault(131000, "Something went wrong")
    alone = parse_payload(envelope(change("1", None, errors=errors)))
    assert alone.media == ()
    assert alone.unattached_faults == (ProviderFault(131000, "Something went wrong"),)
    assert alone.unattached_faults[0].describe() == "131000: Something went wrong"
    assert ProviderFault(None, "t").describe() == "?: t"


def test_non_message_fields_are_ignored() -> None:
    document = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "account_update", "value": {"event": "x"}}]}],
    }
    parsed = parse_payload(document)
    assert (parsed.media, parsed.phone_number_ids, parsed.ignored) == ((), (), 1)


def test_numeric_phone_number_id_and_timestamps() -> None:
    message = media_message(timestamp="x")
    message["timestamp"] = "not-a-time"
    event = only_event(envelope(change(12345, [message])))  # type: ignore[arg-type]
    assert event.phone_number_id == "12345"
    assert event.timestamp is None
    message["timestamp"] = 10**30
    assert only_event(envelope(change("1", [message]))).timestamp is None
    message["timestamp"] = 1718000000
    assert only_event(envelope(change("1", [message]))).timestamp is not None


@pytest.mark.parametrize("digits", ["²", "١٧١٨٠٠٠٠٠٠", "1²"])
def test_numbers_in_strings_are_ascii_digits_only(digits: str) -> None:
    # str.isdigit() accepts these; int() refuses "²" and would read Arabic-Indic digits.
    message = media_message()
    message["timestamp"] = digits
    message["errors"] = [{"code": digits, "title": "Something went wrong"}]
    event = only_event(envelope(change("1", [message])))
    assert event.timestamp is None
    assert event.fault is not None and event.fault.code is None
    with pytest.raises(PayloadError, match="file_size"):
        parse_payload(envelope(change("1", [media_message(file_size=digits)])))


def test_numbers_in_ascii_strings_are_read() -> None:
    message = media_message(file_size="2048")
    message["timestamp"] = "1718000000"
    message["errors"] = [{"code": "131052", "title": "Media file too large"}]
    event = only_event(envelope(change("1", [message])))
    assert event.file_size == 2048
    assert event.timestamp == datetime.fromtimestamp(int(message["timestamp"]), tz=UTC)
    assert event.fault is not None and event.fault.code == 131052


def test_user_text_is_repaired_not_refused() -> None:
    message = media_message(caption="a\x00b\ud800c", filename="x\x00.pdf")
    event = only_event(envelope(change("1", [message])))
    assert event.caption == "ab?c"
    assert event.filename == "x.pdf"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Malformed JSON"),
        (b"\xff\xfe", "Malformed JSON"),
        (b"[]", "body must be an object"),
        (b"{}", "entry must be a list"),
        (b'{"object": "page", "entry": []}', "Unsupported webhook object"),
        (b'{"entry": [1]}', "entry[] must be an object"),
        (b'{"entry": [{"changes": [{"value": []}]}]}', "changes[].value must be an object"),
        (b'{"entry": [{"changes": [{"value": {"messages": {}}}]}]}', "value.messages"),
        (b'{"entry": [{"changes": [{"value": {"messages": [{"id": "m"}]}}]}]}', "type"),
        (b'{"entry": [{"changes": [{"value": {"messages": [{"type": "image"}]}}]}]}', "id"),
        (b"[" * 100000, "Malformed JSON"),
        (b'{"entry": [' + b"1" * 5000 + b"]}", "Malformed JSON"),  # past int's digit limit
    ],
)
def test_unreadable_bodies_raise_payload_error(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=re.escape(message)):
        parse_body(body)


@pytest.mark.parametrize(
    "overrides",
    [
        {"id": "m" * 256},
        {"id": "a\x00b"},
        {"id": "wamid.a\nb"},
        {"image": {"id": "1\x85", "mime_type": "image/jpeg"}},
        {"from": "1" * 65},
        {"image": {"mime_type": "image/jpeg"}},  # no media id
        {"image": {"id": "1", "mime_type": "x" * 256}},
        {"image": {"id": "1", "file_size": -1}},
        {"image": {"id": "1", "caption": 5}},
        {"image": "not an object"},
    ],
)
def test_fields_that_would_not_fit_the_row_are_refused(overrides: dict[str, Any]) -> None:
    message = media_message("image")
    message.update(overrides)
    with pytest.raises(PayloadError):
        parse_payload(envelope(change("1", [message])))


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_any_json_parses_or_raises_payload_error(document: Any) -> None:
    with contextlib.suppress(PayloadError):
        parse_body(json.dumps(document).encode())


@settings(max_examples=150, deadline=None)
@given(webhook_documents("555"))
def test_near_valid_documents_parse_to_clean_records_or_payload_error(document: Any) -> None:
    try:
        parsed = parse_payload(document)
    except PayloadError:
        return
    for event in parsed.media:
        assert event.message_id and len(event.message_id) <= 255
        # "555" as drawn, or whatever else the draw put there (an integer id is accepted as
        # its digits): always a clean identifier.
        phone = event.phone_number_id
        assert phone is None or (
            phone.strip() and len(phone) <= MAX_ID_CHARS and not has_control_character(phone)
        )
        assert event.sender is None or len(event.sender) <= 64
        assert event.sha256 is None or len(event.sha256) == 64
        assert event.fault is not None or event.media_id
        for text in (event.caption, event.filename, event.mime_type, event.url):
            if text is not None:
                assert "\x00" not in text
                text.encode("utf-8")  # no lone surrogates: every backend can store it
