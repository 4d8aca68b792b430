"""Real media bytes for the sandbox: small valid files, padded to any size the format tolerates.

Each media type has a sample in ``sandbox/media/`` (JPEG/PNG images, PDF documents, OGG/Opus
audio, MP4 video, WebP stickers). A larger item is the sample plus deterministic padding in
a place its format ignores, so it still sniffs (``filetype``) and decodes as its type:

- JPEG, PNG, OGG: bytes after the end marker (EOI, IEND, last page);
- PDF: one comment line after ``%%EOF``;
- MP4: a trailing ``free`` box;
- WebP: an unknown chunk inside the RIFF container (extended format readers skip it).

Bytes are regenerated from a seed on every read, so a 100 MB item costs no memory.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

Padding = Literal["trailing", "pdf", "mp4", "webp"]
CHUNK = 256 * 1024


@dataclass(frozen=True)
class Sample:
    media_type: str
    mime_type: str
    filename: str
    padding: Padding

    def data(self) -> bytes:
        return resources.files("sandbox").joinpath("media", self.filename).read_bytes()


SAMPLES: tuple[Sample, ...] = (
    Sample("image", "image/jpeg", "sample.jpg", "trailing"),
    Sample("image", "image/png", "sample.png", "trailing"),
    Sample("document", "application/pdf", "sample.pdf", "pdf"),
    Sample("audio", "audio/ogg; codecs=opus", "sample.ogg", "trailing"),
    Sample("video", "video/mp4", "sample.mp4", "mp4"),
    Sample("sticker", "image/webp", "sample.webp", "webp"),
)
MEDIA_TYPES = tuple(dict.fromkeys(s.media_type for s in SAMPLES))

_PRINTABLE = bytes(0x20 + (b % 0x5F) for b in range(256))  # PDF comment: no line breaks
_NO_CAPITAL_O = bytes(b if b != 0x4F else 0x50 for b in range(256))  # never "OggS"


def sample_for(media_type: str, mime_type: str | None = None) -> Sample:
    """The sample of ``media_type``, preferring one of ``mime_type`` when there is one."""
    candidates = [s for s in SAMPLES if s.media_type == media_type]
    if not candidates:
        raise ValueError(f"unknown media type {media_type!r}")
    if mime_type:
        wanted = mime_type.split(";", 1)[0].strip().lower()
        for sample in candidates:
            if sample.mime_type.split(";", 1)[0] == wanted:
                return sample
    return candidates[0]


@dataclass(frozen=True)
class Blob:
    """The bytes of one sandbox item: ``sample`` padded to ``size`` with padding from ``seed``."""

    sample: Sample
    size: int
    seed: int
    sha256: str = field(default="", compare=False)

    @classmethod
    def build(cls, sample: Sample, size: int | None, seed: int) -> Blob:
        natural = len(sample.data())
        blob = cls(sample, max(natural, size or natural), seed)
        digest = hashlib.sha256()
        for chunk in blob.chunks():
            digest.update(chunk)
        return cls(blob.sample, blob.size, blob.seed, digest.hexdigest())

    def chunks(self) -> Iterator[bytes]:
        base = self.sample.data()
        extra = self.size - len(base)
        if extra <= 0:
            yield base
            return
        style = self.sample.padding
        if style == "webp" and extra >= 8:
            even = extra - (extra % 2)  # RIFF chunks are even-sized; an odd byte trails
            riff_size = struct.unpack("<I", base[4:8])[0] + even
            yield base[:4] + struct.pack("<I", riff_size) + base[8:]
            yield b"PADD" + struct.pack("<I", even - 8)
            yield from self._padding(even - 8, None)
            yield from self._padding(extra - even, None)
            return
        yield base
        if style == "mp4" and extra >= 8:
            yield struct.pack(">I", extra) + b"free"
            yield from self._padding(extra - 8, None)
        elif style == "pdf":
            yield b"%" if extra > 1 else b"\n"
            yield from self._padding(max(extra - 2, 0), _PRINTABLE)
            if extra > 1:
                yield b"\n"
        else:
            yield from self._padding(extra, _NO_CAPITAL_O)

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def _padding(self, n: int, table: bytes | None) -> Iterator[bytes]:
        rng = random.Random(self.seed)
        while n > 0:
            step = min(CHUNK, n)  # fixed steps: the same seed gives the same bytes
            data = rng.randbytes(step)
            yield data.translate(table) if table else data
            n -= step
