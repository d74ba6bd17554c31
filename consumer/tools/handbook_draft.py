"""`tagstream handbook draft`: a first interest handbook drafted by the LLM from the operator's
own data, for a person to review and edit before it guides anything.

Per category of the tag system (a tag's `category`, or the label itself when tags have
none), the LLM sees the category's tags and a few of its items and proposes what its users
care about, the facets a tag should name, good tags (only ones the category has) and too
vague ones. The result is a handbook file (consumer/schemas/handbook.v1.json) with its
provenance; a category the LLM could not draft is left out and reported.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from consumer.tagging.events import event_text
from consumer.tagging.handbook import Handbook
from consumer.tagging.llm import SelectiveTagger
from consumer.tools.evaluate import to_event
from tagsys import TagSystem
from tagsys.datasets import DatasetError, load

Progress = Callable[[int, int], None]


def draft(
    tagger: SelectiveTagger,
    data: Path,
    fmt: str,
    *,
    level: int = 1,
    tag_system: TagSystem | None = None,
    name: str = "drafted",
    version: str = "1",
    examples: int = 5,
    max_categories: int = 40,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(handbook document, report). Categories are taken by how many items they have."""
    ds = load(data, fmt, level=level)
    if not ds.items:
        raise DatasetError(f"{data}: no labelled items with text")
    category_of: dict[str, str] = {}
    if tag_system is not None:
        category_of = {t.name: t.category or t.name for t in tag_system.tags}
    tags_of: dict[str, set[str]] = defaultdict(set)
    texts_of: dict[str, list[str]] = defaultdict(list)
    count: Counter[str] = Counter()
    for it in ds.items:
        for label in it.gold:
            cat = category_of.get(label, label) if category_of else label
            tags_of[cat].add(label)
            count[cat] += 1
            if len(texts_of[cat]) < examples:
                texts_of[cat].append(event_text(to_event(it), max_chars=300))
    if category_of:  # every tag of the category, not only those the data uses
        for tag, cat in category_of.items():
            if cat in tags_of:
                tags_of[cat].add(tag)
    chosen = [c for c, _ in count.most_common(max_categories)]
    sections: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for n, cat in enumerate(chosen, 1):
        section, answer = tagger.handbook_section(cat, sorted(tags_of[cat]), texts_of[cat])
        if section is None:
            failed[cat] = answer.error or answer.status
        else:
            sections.append(section)
        if progress:
            progress(n, len(chosen))
    if not sections:
        raise DatasetError(f"the LLM drafted no category ({len(failed)} failed: {failed})")
    doc = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "categories": sections,
        "provenance": {
            "drafted_by": tagger.model,
            "data": data.name,
            "tag_system": tag_system.version_id if tag_system else None,
            "examples_per_category": examples,
            "reviewed": False,
        },
    }
    hb = Handbook.parse(orjson.dumps(doc), "the draft")  # what `run --llm-handbook` will load
    report = {
        "categories": len(chosen),
        "drafted": len(sections),
        "failed": failed,
        "handbook_version": hb.version_id,
        "categories_left_out": max(0, len(count) - len(chosen)),
    }
    return doc, report
