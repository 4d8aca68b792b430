"""Is what we downloaded what the provider said it is? Size, sha256 and first bytes.

The body is spooled (small in memory, large on disk) while it is hashed, so a 100 MB document
never sits in memory and nothing reaches the object store before it was checked.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, cast

import filetype

from ingest.media_rules import base_mime

# filetype looks at no more than this many leading bytes.
HEAD_BYTES = 8192
# Bodies up to this size stay in memory while spooled; larger ones roll over to a temp file.
SPOOL_MEMORY_BYTES = 1024 * 1024

OCTET_STREAM = "application/octet-stream"


class BodyTooLarge(Exception):
    """The stream passed its cap; the spool stopped reading (nothing was kept)."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"body passed the cap of {cap} bytes")
        self.cap = cap


class HashingSpool:
    """A write-once buffer that hashes, counts and keeps the first bytes of what it is given.

    Use as a context manager; after :meth:`finish` it reads back from the start.
    """

    def __init__(self, *, cap: int, memory_bytes: int = SPOOL_MEMORY_BYTES) -> None:
        self.cap = cap
        # In memory up to memory_bytes, then a named file on disk: a store that uploads by
        # path (S3's managed transfer) sends it as it is, without copying it first.
        self._memory_bytes = memory_bytes
        self._file: BinaryIO = io.BytesIO()
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self.size = 0

    def __enter__(self) -> HashingSpool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.cap:
            raise BodyTooLarge(self.cap)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._hash.update(chunk)
        if isinstance(self._file, io.BytesIO) and self.size + len(chunk) > self._memory_bytes:
            self._roll_to_disk()
        self._file.write(chunk)
        self.size += len(chunk)

    def _roll_to_disk(self) -> None:
        assert isinstance(self._file, io.BytesIO)
        # Closed by close()/__exit__ (and then deleted): the spool outlives this call.
        disk = tempfile.NamedTemporaryFile(prefix="ingest-dl-")  # noqa: SIM115
        disk.write(self._file.getbuffer())
        self._file = cast(BinaryIO, disk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    def reader(self) -> BinaryIO:
        """The spooled body from its first byte (for ``Storage.put``); past the memory
        threshold a file whose ``name`` is its path."""
        self._file.flush()
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Expectation:
    """What one source (the webhook or the lookup) stated about the bytes."""

    source: str  # "webhook" or "lookup": for the error message only
    sha256: str | None
    size: int | None


def checksum_problem(size: int, sha256: str, expected: list[Expectation]) -> str | None:
    """A short reason when the bytes contradict a stated size or sha256, else None."""
    for stated in expected:
        if stated.size is not None and stated.size != size:
            return f"size {size} differs from the {stated.source}'s {stated.size}"
        if stated.sha256 is not None and stated.sha256 != sha256:
            return f"sha256 differs from the {stated.source}'s"
    return None


# --- MIME types --------------------------------------------------------------------------

# Families whose members share one container or magic number: filetype reports one member,
# the provider may declare another. Office formats are containers (ZIP for OOXML, OLE2 for the
# old binary formats), so the bytes alone cannot always tell which application wrote them.
_FAMILIES: tuple[frozenset[str], ...] = (
    frozenset({"image/jpeg", "image/jpg", "image/pjpeg"}),
    frozenset({"audio/mpeg", "audio/mp3", "audio/mpeg3"}),
    frozenset(
        {
            "video/mp4",
            "audio/mp4",
            "audio/m4a",
            "audio/x-m4a",
            "video/x-m4v",
            "video/3gpp",
            "video/3gp",
            "audio/3gpp",
            "video/quicktime",
            "audio/aac",  # WhatsApp voice/audio .m4a is often declared as aac
        }
    ),
    frozenset({"audio/aac", "audio/aacp", "audio/x-aac"}),
    frozenset({"audio/ogg", "audio/opus", "application/ogg", "video/ogg"}),
    frozenset({"audio/amr", "audio/amr-nb", "audio/3gpp"}),
    frozenset(
        {
            "application/zip",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
            "application/vnd.oasis.opendocument.text",
            "application/vnd.oasis.opendocument.spreadsheet",
            "application/vnd.oasis.opendocument.presentation",
            "application/epub+zip",
        }
    ),
    frozenset(
        {
            "application/x-ole-storage",
            "application/msword",
            "application/vnd.ms-excel",
            "application/vnd.ms-powerpoint",
        }
    ),
)

# Containers whose sniffed name says less than a compatible declared type.
_GENERIC_SNIFFS = frozenset({"application/zip", "application/x-ole-storage"})

# Declared types with a magic number that never misses: bytes that sniff as nothing are not
# such a file. For every other type an unidentified body passes if nothing contradicts it
# (plain text, CSV, MP3 frames without an ID3 tag, ...).
_ALWAYS_SNIFFABLE = frozenset({"image/jpeg", "image/png", "image/webp", "application/pdf"})

# Declared types under which an HTML or JSON body is plausible content, not an error page.
_TEXTUAL = re.compile(r"^(text/|application/(json|xml|xhtml\+xml|javascript)$|.*\+(json|xml)$)")

_MARKUP_START = re.compile(rb"^\s*(<!doctype\s+html|<html|<\?xml|<head|<body|<error)", re.I)
_JSON_START = re.compile(rb'^\s*(\{\s*["}]|\[\s*(["{\[\]]|-?\d|true|false|null))')


@dataclass(frozen=True)
class MimeVerdict:
    ok: bool
    mime: str  # the type to record: sniffed, or the declared one when the bytes cannot tell
    problem: str | None = None


def sniff(head: bytes) -> str | None:
    return filetype.guess_mime(head) if head else None


def looks_like_error_page(head: bytes) -> bool:
    """An HTML, XML or JSON document: what a CDN or API answers instead of the media."""
    body = head.removeprefix(b"\xef\xbb\xbf")
    return bool(_MARKUP_START.match(body) or _JSON_START.match(body))


def compatible(declared: str, sniffed: str) -> bool:
    if declared == sniffed:
        return True
    return any(declared in family and sniffed in family for family in _FAMILIES)


def check_mime(declared_mime: str | None, head: bytes) -> MimeVerdict:
    """Do the first bytes agree with the declared MIME type?

    A declared type whose bytes sniff as something else is a mismatch, and so is an
    HTML/JSON error page served under a media type. Types filetype cannot identify
    (``text/plain``...) pass when nothing contradicts them.
    """
    declared = base_mime(declared_mime)
    sniffed = sniff(head)
    if declared is None:
        if sniffed is None and looks_like_error_page(head):
            return MimeVerdict(False, OCTET_STREAM, "no declared type and body is markup/JSON")
        return MimeVerdict(True, sniffed or OCTET_STREAM)
    if sniffed is not None:
        if not compatible(declared, sniffed):
            return MimeVerdict(False, sniffed, f"declared {declared}, bytes are {sniffed}")
        return MimeVerdict(True, declared if sniffed in _GENERIC_SNIFFS else sniffed)
    if not _TEXTUAL.match(declared) and looks_like_error_page(head):
        return MimeVerdict(False, declared, f"declared {declared}, body is an error page")
    if declared in _ALWAYS_SNIFFABLE:
        return MimeVerdict(False, declared, f"declared {declared}, bytes are not one")
    return MimeVerdict(True, declared)
