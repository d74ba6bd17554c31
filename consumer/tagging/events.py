"""Decode and validate upload events; encode tag events (JSON Schemas in consumer/schemas/)."""

from __future__ import annotations

import importlib.resources
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tagsys.errors import TagstreamError

SCHEMA_VERSION = 1
CE_TYPE = "dev.tagstream.tags.v1"
TEXT_FIELDS = ("title", "caption", "cover_text", "ocr", "asr")
MAX_URL_CHARS = 2048
MAX_FRAME_URLS = 16  # more is a malformed event; the service reads at most --image-max-frames
# a `#` that marks a hashtag (`#美食`, `#情感视频#`, a stray `#`) but not one that ends a
# one-letter name (`C#`, `F#`)
_HASHTAG_MARK = re.compile(r"(?<!\b[A-Za-z])#")
_SPACES = re.compile(r"[ \t]{2,}")


class DecodeError(TagstreamError):
    """An input record that cannot become an UploadEvent; `reason` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UploadEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1
    id: str = Field(min_length=1, max_length=512)
    title: str | None = None
    caption: str | None = None
    ocr: str | None = None
    asr: str | None = None
    cover_text: str | None = None
    hashtags: list[str] = Field(default_factory=list)
    content_type: str | None = None
    lang: str | None = None
    created_at: str | None = None
    # images (optional, schema version 1 still): fetched only from --image-hosts
    cover_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    frame_urls: list[Annotated[str, Field(max_length=MAX_URL_CHARS)]] = Field(
        default_factory=list, max_length=MAX_FRAME_URLS
    )
    cover_b64: str | None = None

    @property
    def has_images(self) -> bool:
        return bool(self.cover_url or self.frame_urls or self.cover_b64)


def decode(value: bytes | None, *, max_bytes: int = 1 << 20) -> UploadEvent:
    """Bytes of one record -> UploadEvent, or DecodeError saying why not."""
    if value is None or len(value) == 0:
        raise DecodeError("empty", "record has no value")
    if len(value) > max_bytes:
        raise DecodeError("oversize", f"record of {len(value)} bytes exceeds {max_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecodeError("not_utf8", f"value is not UTF-8: {e}") from e
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise DecodeError("not_json", f"value is not JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DecodeError("schema", f"value is JSON {type(raw).__name__}, not an object")
    if "id" not in raw:
        raise DecodeError("missing_id", "event has no id")
    try:
        return UploadEvent.model_validate(raw, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reason = "schema_version" if where == "schema_version" else "schema"
        raise DecodeError(reason, f"schema violation at {where or '<root>'}: {first['msg']}") from e


def unmark_hashtags(text: str) -> str:
    """`#美食 #家常菜` → `美食 家常菜`: the words stay, the markers go. Measured with
    multilingual-e5-small on KuaiRec (cover text + caption), label-free: recall@10 of the
    category 0.645 → 0.660 (level 1, rows 3,001 on) and 0.385 → 0.399 (level 2); XLM-R's
    sentencepiece glues `#` to the word, so `#美食` is not `美食` to the encoder."""
    if "#" not in text:
        return text
    return _SPACES.sub(" ", _HASHTAG_MARK.sub(" ", text)).strip()


def event_text(ev: UploadEvent, *, max_chars: int = 2000) -> str:
    """The text the encoder reads: the text fields in order, then the hashtags as words;
    capped per field; hashtag markers dropped (`unmark_hashtags`)."""
    parts = [unmark_hashtags(getattr(ev, f)[:max_chars]) for f in TEXT_FIELDS if getattr(ev, f)]
    if ev.hashtags:
        parts.append(unmark_hashtags(" ".join(h[:100] for h in ev.hashtags[:30])))
    return ". ".join(p.strip() for p in parts if p.strip())


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ce_headers(
    *, event_id: str, source_ref: str, ce_source: str, time_iso: str
) -> list[tuple[str, str | bytes | None]]:
    """CloudEvents Kafka binary-mode headers for one tag event."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", source_ref.encode()),
        ("ce_source", ce_source.encode()),
        ("ce_type", CE_TYPE.encode()),
        ("ce_subject", event_id.encode()),
        ("ce_time", time_iso.encode()),
        ("content-type", b"application/json"),
    ]


def load_schema(name: Literal["upload-event", "tag-event", "decision"]) -> dict[str, Any]:
    raw = importlib.resources.files("consumer").joinpath("schemas", f"{name}.v1.json").read_bytes()
    schema: dict[str, Any] = orjson.loads(raw)
    return schema
