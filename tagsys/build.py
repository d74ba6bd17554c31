"""Vocabulary construction from LLM proposals (TagGPT step 1), minus the LLM calls.

Proposals -> normalised surface forms, grouped by English stems -> document frequency ->
frequency floor -> synonym merge by embedding similarity (the merged forms become aliases) ->
categories. Pure numpy so each step is testable with a fake encoder.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tagsys.lexicon import normalise, stem_key
from tagsys.tagsystem import Tag

EncodeFn = Callable[[list[str]], npt.NDArray[np.float32]]
_EDGE = re.compile(
    r"^[\s#\"'“”‘’「」『』()\[\]{}<>.,;:!?，。！？；：、·…*_~-]+|[\s\"'“”‘’「」『』()\[\]{}<>.,;:!?，。！？；：、·…*_~-]+$"
)
_SPACE = re.compile(r"\s+")


def normalise_tag(raw: str) -> str:
    """NFKC, trimmed of punctuation and '#', single spaces, case-folded ("" when nothing is
    left). Two proposals are the same tag when their normal forms are equal."""
    t = unicodedata.normalize("NFKC", raw).replace("_", " ")
    t = _SPACE.sub(" ", t).strip()
    t = _EDGE.sub("", t)
    return t.casefold()


@dataclass(frozen=True)
class Candidate:
    key: str  # normal form
    name: str  # the most frequent surface form
    items: int  # in how many items it was proposed
    forms: tuple[str, ...]  # other surface forms seen


def _group(key: str) -> str:
    """Proposals in one group are one tag: equal normal forms, or (Latin text) equal English
    stems — "meat" / "meats", "grilled" / "grilling" — counted together before the floor.
    Stems over-merge now and then ("fish" / "fishing"; docs/QUALITY.md)."""
    return stem_key(normalise(key)) or key


def count(proposals: Iterable[Sequence[str]]) -> list[Candidate]:
    """`proposals` holds, per item, every tag its samples proposed. Counts items, not
    samples, so one chatty item cannot make a tag frequent."""
    per_item: Counter[str] = Counter()  # items per group
    key_items: Counter[str] = Counter()  # items per normal form
    surface: dict[str, Counter[str]] = {}  # surface forms per normal form
    members: dict[str, set[str]] = {}  # normal forms per group
    for tags in proposals:
        seen: set[str] = set()
        groups: set[str] = set()
        for raw in tags:
            key = normalise_tag(raw)
            if not key or len(key) > 40:
                continue
            shown = _EDGE.sub("", _SPACE.sub(" ", unicodedata.normalize("NFKC", raw)).strip())
            surface.setdefault(key, Counter())[shown] += 1
            group = _group(key)
            members.setdefault(group, set()).add(key)
            seen.add(key)
            groups.add(group)
        per_item.update(groups)
        key_items.update(seen)
    out = []
    # ties broken by length and text, so the result does not depend on the order answers
    # arrived in: the group's name is the most frequent form of its most frequent key
    for group, n in sorted(per_item.items(), key=lambda kv: (-kv[1], kv[0])):
        keys = sorted(members[group], key=lambda k: (-key_items[k], len(k), k))
        forms = [
            f for k in keys for f, _ in sorted(surface[k].items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        out.append(Candidate(keys[0], forms[0], n, tuple(forms[1:])))
    return out


def merge_synonyms(
    cands: Sequence[Candidate],
    emb: npt.NDArray[np.float32],
    threshold: float,
    alone: Collection[int] = (),
) -> list[tuple[Candidate, list[Candidate]]]:
    """Greedy by frequency: a candidate within `threshold` cosine of a kept, more frequent
    one becomes its alias. Candidates in `alone` (their vectors say nothing: an encoder that
    cannot read them) neither merge nor take others in. Returns (kept, merged-into-it) pairs."""
    kept: list[int] = []
    mergeable: list[int] = []
    groups: dict[int, list[int]] = {}
    for i in range(len(cands)):
        if i not in alone and mergeable:
            sims = emb[mergeable] @ emb[i]
            j = int(np.argmax(sims))
            if sims[j] >= threshold:
                groups[mergeable[j]].append(i)
                continue
        kept.append(i)
        if i not in alone:
            mergeable.append(i)
        groups[i] = []
    return [(cands[k], [cands[m] for m in groups[k]]) for k in kept]


def to_tags(
    groups: Sequence[tuple[Candidate, list[Candidate]]],
    categories: Sequence[str | None] | None = None,
    descriptions: Sequence[str | None] | None = None,
) -> list[Tag]:
    tags = []
    for n, (head, merged) in enumerate(groups):
        aliases = list(
            dict.fromkeys([*head.forms, *(f for m in merged for f in (m.name, *m.forms))])
        )
        aliases = [a for a in aliases if normalise_tag(a) != head.key or a != head.name]
        tags.append(
            Tag(
                id=head.key,
                name=head.name,
                aliases=tuple(a for a in aliases if a != head.name),
                category=categories[n] if categories else None,
                description=descriptions[n] if descriptions else None,
            )
        )
    return tags


def nearest_category(
    tag_emb: npt.NDArray[np.float32], cat_emb: npt.NDArray[np.float32], names: Sequence[str]
) -> list[str]:
    """Each tag's category: the most similar category name (both sides unit vectors)."""
    return [names[int(j)] for j in np.argmax(tag_emb @ cat_emb.T, axis=1)]
