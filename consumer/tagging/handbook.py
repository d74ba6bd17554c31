"""The interest handbook (TagLLM's): per content category, what its users care about and which
facets a tag should name, with good and bad tag examples. The section for an item's category
goes into the LLM's instructions, so a tag names what matters to the people who browse that
category rather than whatever the model reaches for first.

The handbook is operator-trusted and goes into the system message; the item stays untrusted
data in the user message. Its version (name, version and content hash) is recorded with
every decision it shaped, so distillation never mixes prompts without knowing it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tagsys.errors import TagstreamError


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=60)
    interests: list[str] = Field(default_factory=list, max_length=8)
    facets: list[str] = Field(default_factory=list, max_length=8)
    good_tags: list[str] = Field(default_factory=list, max_length=8)
    bad_tags: list[str] = Field(default_factory=list, max_length=8)


class HandbookFile(BaseModel):
    """consumer/schemas/handbook.v1.json, as pydantic validates it at load."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1]
    name: str = Field(min_length=1, max_length=60)
    version: str = Field(min_length=1, max_length=40)
    categories: list[Category] = Field(min_length=1)
    # how it was made (`handbook draft` records its model and data): for the reviewer
    provenance: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Handbook:
    name: str
    version: str
    categories: dict[str, Category]
    content_hash: str

    @property
    def version_id(self) -> str:
        return f"{self.name}@{self.version}#{self.content_hash[:12]}"

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Handbook:
        try:
            doc = HandbookFile.model_validate(orjson.loads(raw))
        except (orjson.JSONDecodeError, ValidationError) as e:
            raise TagstreamError(
                f"{where}: not a handbook (consumer/schemas/handbook.v1.json): {e}"
            ) from None
        cats = {c.name.lower(): c for c in doc.categories}
        if len(cats) != len(doc.categories):
            raise TagstreamError(f"{where}: a category is named twice")
        canonical = orjson.dumps(doc.model_dump(), option=orjson.OPT_SORT_KEYS)
        return cls(doc.name, doc.version, cats, hashlib.sha256(canonical).hexdigest())

    @classmethod
    def load(cls, path: str | Path) -> Handbook:
        """A handbook file, or `sample`: the one bundled for the sample vocabulary."""
        if str(path) == "sample":
            raw = importlib.resources.files("consumer").joinpath("sample", "handbook.json")
            return cls.parse(raw.read_bytes(), "the sample handbook")
        p = Path(path)
        try:
            return cls.parse(p.read_bytes(), str(p))
        except OSError as e:
            raise TagstreamError(f"cannot read handbook {p}: {e.strerror or e}") from None

    def section(self, category: str | None) -> str | None:
        """The guidance for one category, as the system message carries it (None: none)."""
        cat = self.categories.get((category or "").lower())
        if cat is None:
            return None
        lines = [f"Handbook for {cat.name} content (from the operator):"]
        if cat.interests:
            lines.append("- Its users care about: " + "; ".join(cat.interests) + ".")
        if cat.facets:
            lines.append("- A good tag names one of: " + ", ".join(cat.facets) + ".")
        if cat.good_tags:
            lines.append("- Good tags look like: " + ", ".join(cat.good_tags) + ".")
        if cat.bad_tags:
            lines.append("- Avoid tags like: " + ", ".join(cat.bad_tags) + ".")
        return "\n".join(lines)
