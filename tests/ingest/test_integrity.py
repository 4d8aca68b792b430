import hashlib

import pytest

from ingest.integrity import (
    BodyTooLarge,
    Expectation,
    HashingSpool,
    check_mime,
    checksum_problem,
    looks_like_error_page,
)

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x01" * 500
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 500
PDF = b"%PDF-1.7\n" + b"0" * 500
OGG = b"OggS\x00\x02" + b"\x00" * 500
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 500
ZIP = b"PK\x03\x04\x14\x00\x00\x00" + b"\x00" * 500


def test_spool_hashes_counts_and_reads_back_from_disk_past_the_memory_limit() -> None:
    body = bytes(range(256)) * 100
    with HashingSpool(cap=len(body), memory_bytes=1000) as spool:
        for start in range(0, len(body), 777):
            spool.write(body[start : start + 777])
        assert spool.size == len(body)
        assert spool.sha256 == hashlib.sha256(body).hexdigest()
        assert spool.head == body[:8192]
        assert spool.reader().read() == body


def test_spool_refuses_past_its_cap_before_keeping_the_chunk() -> None:
    with HashingSpool(cap=10) as spool:
        spool.write(b"12345")
        with pytest.raises(BodyTooLarge):
            spool.write(b"123456")
        assert spool.size == 5


def test_checksum_problem_names_the_source_and_never_passes_a_difference() -> None:
    digest = hashlib.sha256(b"abc").hexdigest()
    ok = [Expectation("webhook", digest, 3), Expectation("lookup", None, None)]
    assert checksum_problem(3, digest, ok) is None
    assert "lookup" in (checksum_problem(3, digest, [Expectation("lookup", "0" * 64, 3)]) or "")
    assert "size" in (checksum_problem(4, digest, [Expectation("webhook", digest, 3)]) or "")


@pytest.mark.parametrize(
    ("declared", "body", "mime"),
    [
        ("image/jpeg", JPEG, "image/jpeg"),
        ("image/png", PNG, "image/png"),
        ("application/pdf", PDF, "application/pdf"),
        ("audio/ogg; codecs=opus", OGG, "audio/ogg"),
        ("video/mp4", MP4, "video/mp4"),
        ("audio/mp4", MP4, "video/mp4"),
        # OOXML is a ZIP: the declared, more specific type is recorded.
        (
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            ZIP,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        ("text/plain", b"hello, plain text\n", "text/plain"),
        ("text/plain", b'{"json": "as text is fine"}', "text/plain"),
        ("audio/mpeg", b"\x00\x01 no id3 header", "audio/mpeg"),
        (None, PNG, "image/png"),
        (None, b"unknown", "application/octet-stream"),
    ],
)
def test_compatible_bytes_pass_and_record_the_sniffed_type(
    declared: str | None, body: bytes, mime: str
) -> None:
    verdict = check_mime(declared, body)
    assert verdict.ok, verdict.problem
    assert verdict.mime == mime


@pytest.mark.parametrize(
    ("declared", "body"),
    [
        ("image/jpeg", PNG),
        ("image/png", PDF),
        ("text/plain", PNG),
        ("image/jpeg", b"<!DOCTYPE html><html><body>error</body></html>"),
        ("video/mp4", b'  {"error": {"message": "expired"}}'),
        ("application/pdf", b"\xef\xbb\xbf<html>"),
        ("image/webp", b"not an image at all"),
    ],
)
def test_contradicting_bytes_and_error_pages_are_mismatches(declared: str, body: bytes) -> None:
    verdict = check_mime(declared, body)
    assert not verdict.ok
    assert verdict.problem


def test_error_page_detection() -> None:
    assert looks_like_error_page(b"\n <html lang=en>")
    assert looks_like_error_page(b'[{"a": 1}]')
    assert not looks_like_error_page(JPEG)
    assert not looks_like_error_page(b"{not json at all")
