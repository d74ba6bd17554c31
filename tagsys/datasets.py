"""Readers for labelled content: KuaiRec, StackExchange CSV and our own JSONL.

Each item carries the fields an upload event has (so `eval` can run the service's decision
path on it) and its gold labels. Readers never drop an item silently: skipped rows are
counted by reason in `Dataset.skipped`.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tagsys.errors import TagstreamError

Format = Literal["kuairec", "stackexchange", "jsonl"]
FORMATS: tuple[str, ...] = ("kuairec", "stackexchange", "jsonl")
UNKNOWN = "UNKNOWN"
_LEVELS = {1: "first", 2: "second", 3: "third"}
_HASHTAG = re.compile(r"#\S+")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DatasetError(TagstreamError):
    """A data file that cannot be read in the format asked for."""


@dataclass(frozen=True)
class Item:
    id: str
    fields: dict[str, Any]  # title / caption / cover_text / ocr / asr / hashtags
    gold: tuple[str, ...] = ()


@dataclass
class Dataset:
    items: list[Item]
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def labels(self) -> list[str]:
        """Distinct gold labels, sorted (the zero-shot vocabulary)."""
        return sorted({g for it in self.items for g in it.gold})


def _clean(v: str | None) -> str:
    v = (v or "").strip()
    return "" if v == UNKNOWN else v


def read_kuairec(path: Path, level: int = 1) -> Iterator[Item | str]:
    """Text = cover text + caption; gold = the category name at `level` (none when it is
    UNKNOWN there: `load` skips such rows where labels are required)."""
    if level not in _LEVELS:
        raise DatasetError(f"KuaiRec level must be 1, 2 or 3, not {level}")
    col = f"{_LEVELS[level]}_level_category_name"
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"video_id", "manual_cover_text", "caption", col}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DatasetError(f"{path}: not a KuaiRec file (needs columns {sorted(need)})")
        for row in reader:
            cover, caption = _clean(row["manual_cover_text"]), _clean(row["caption"])
            label = _clean(row[col])
            if not cover and not caption:
                yield "no_text"
            else:  # unlabelled at this level: `load` skips it unless labels are optional
                yield Item(
                    str(row["video_id"]),
                    {"cover_text": cover, "caption": caption},
                    (label,) if label else (),
                )


def read_stackexchange(path: Path) -> Iterator[Item | str]:
    """Text = title + content; gold = the tags (comma separated)."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"title", "content", "tags"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise DatasetError(f"{path}: not a StackExchange file (needs columns {sorted(need)})")
        for n, row in enumerate(reader):
            title, content = (row["title"] or "").strip(), (row["content"] or "").strip()
            tags = tuple(dict.fromkeys(t.strip() for t in (row["tags"] or "").split(",")))
            tags = tuple(t for t in tags if t)
            if not title and not content:
                yield "no_text"
            else:
                yield Item(str(row.get("id") or n), {"title": title, "caption": content}, tags)


_TEXT_KEYS = ("title", "caption", "cover_text", "ocr", "asr")
IMAGE_KEYS = ("cover_url", "frame_urls", "cover_b64")


def has_text(item: Item) -> bool:
    return any(item.fields.get(k) for k in _TEXT_KEYS)


def read_jsonl(path: Path) -> Iterator[Item | str]:
    """Upload events (consumer/schemas/upload-event.v1.json) plus a `labels` (or `tags`)
    list; lines without labels still count as unlabelled content (for build-tags)."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield "bad_json"
                continue
            if not isinstance(obj, dict):
                yield "bad_json"
                continue
            fields: dict[str, Any] = {
                k: str(obj[k]) for k in _TEXT_KEYS if isinstance(obj.get(k), str) and obj[k]
            }
            tags = obj.get("hashtags")
            if isinstance(tags, list):
                fields["hashtags"] = [str(t) for t in tags if isinstance(t, str | int)]
            if isinstance(obj.get("content_type"), str):  # picks a handbook section
                fields["content_type"] = obj["content_type"]
            for k in ("cover_url", "cover_b64"):  # images: eval and calibrate --image-model
                if isinstance(obj.get(k), str) and obj[k]:
                    fields[k] = obj[k]
            frames = obj.get("frame_urls")
            if isinstance(frames, list) and frames:
                fields["frame_urls"] = [str(u) for u in frames if isinstance(u, str)]
            # an item with an image but no text is kept: `eval --image-model` scores it
            if not any(fields.get(k) for k in (*_TEXT_KEYS, *IMAGE_KEYS)):
                yield "no_text"
                continue
            raw = obj.get("labels", obj.get("gold", []))
            gold = tuple(dict.fromkeys(str(x) for x in raw)) if isinstance(raw, list) else ()
            yield Item(str(obj.get("id", n)), fields, gold)


def load(
    path: str | Path,
    fmt: str,
    *,
    level: int = 1,
    limit: int | None = None,
    require_labels: bool = True,
    image_only: bool = False,
) -> Dataset:
    """`image_only`: keep JSONL items that have an image but no text (`eval --image-model`
    scores them); otherwise they count as `no_text`, as nothing else can read them."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"no such data file: {p}")
    if fmt == "kuairec":
        rows: Iterator[Item | str] = read_kuairec(p, level)
    elif fmt == "stackexchange":
        rows = read_stackexchange(p)
    elif fmt == "jsonl":
        rows = read_jsonl(p)
    else:
        raise DatasetError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    ds = Dataset(items=[])
    for r in rows:
        if isinstance(r, str):
            ds.skipped[r] += 1
            continue
        if require_labels and not r.gold:
            ds.skipped["no_label"] += 1
            continue
        if not image_only and not has_text(r):
            ds.skipped["no_text"] += 1
            continue
        ds.items.append(r)
        if limit and len(ds.items) >= limit:
            break
    return ds


def strip_hashtags(text: str) -> str:
    """Captions repeat their #hashtags; evaluating against hashtags needs them gone."""
    return _HASHTAG.sub(" ", text).strip()
