"""Object keys: whatever the instance name or media id, the storage accepts the key."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.media_rules import object_key
from ingest.models import MediaType
from ingest.storage import validate_key

AWKWARD = [
    ".hidden",
    ".",
    "..",
    "...",
    "",
    "a/../b",
    "/etc/passwd",
    "back\\slash",
    "with space",
    " ",
    "tab\there",
    "new\nline",
    "nul\x00byte",
    "ünïcødé",
    "日本語",
    "emoji-😀",
    "lone-\udcff-surrogate",
    "x" * 5000,
    "." * 300,
    "ends.meta.json",
]


@pytest.mark.parametrize("name", AWKWARD)
def test_every_key_passes_the_storage_check(name: str) -> None:
    for ref in [*AWKWARD, "1234567890", "wamid.HBgM=="]:
        for media_type in MediaType:
            assert validate_key(object_key(name, media_type.value, ref))


@pytest.mark.parametrize("media_type", AWKWARD)
def test_an_odd_media_type_still_gives_a_valid_key(media_type: str) -> None:
    assert validate_key(object_key("shop", media_type, "123"))


def test_keys_are_deterministic_and_one_per_instance_and_media() -> None:
    assert object_key(".shop", "image", ".123") == object_key(".shop", "image", ".123")
    keys = {object_key(name, "image", ref) for name in AWKWARD for ref in AWKWARD}
    assert len(keys) == len(AWKWARD) ** 2


def test_keys_that_were_already_valid_keep_their_name() -> None:
    # Objects already stored must be found again by a repeated download.
    assert object_key("shop", "image", "1234567890") == "shop/image/1234567890-9b24eacdff59"


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from([t.value for t in MediaType]), st.text())
def test_any_text_gives_a_valid_key(name: str, media_type: str, ref: str) -> None:
    assert validate_key(object_key(name, media_type, ref))
