"""Adapt a tag system to a corpus of unlabelled content (no labels used).

Two label-free corrections, measured in docs/QUALITY.md:
- lexical prototypes: items that literally name a tag are pseudo-examples of it; each tag
  embedding moves towards the mean of its pseudo-examples (kept near the name by `keep`);
- hubness bias: tags close to everything crowd every shortlist; their mean score over the
  corpus is stored as a per-tag offset and subtracted at scoring time.
Both help on StackExchange cooking and do not on KuaiRec categories, so they are a choice
(`--adapt`), not a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from tagsys.shortlist import unit
from tagsys.tagsystem import TagSystem

F32 = npt.NDArray[np.float32]


def adapt(
    ts: TagSystem,
    item_embeddings: F32,
    texts: Sequence[str],
    *,
    keep: float = 0.7,
    min_mentions: int = 3,
    hubness: bool = True,
) -> TagSystem:
    """A new tag system whose embeddings (and bias) are fitted to this unlabelled corpus."""
    if len(texts) != item_embeddings.shape[0]:
        raise ValueError("one text per embedding row")
    lex = ts.lexicon
    emb = ts.embeddings.copy()
    members: dict[int, list[int]] = {}
    for i, text in enumerate(texts):
        for j in lex.match(text):
            members.setdefault(j, []).append(i)
    moved = 0
    for j, rows in members.items():
        if len(rows) >= min_mentions:
            centroid = unit(item_embeddings[rows].mean(0))
            emb[j] = unit(keep * ts.embeddings[j] + (1 - keep) * centroid)
            moved += 1
    bias = None
    if hubness:
        bias = np.zeros(len(ts.tags), dtype=np.float32)
        for s in range(0, item_embeddings.shape[0], 1024):
            bias += (item_embeddings[s : s + 1024] @ emb.T).sum(0)
        bias /= max(1, item_embeddings.shape[0])
    prov = dict(ts.provenance)
    prov["adapted"] = {
        "items": int(item_embeddings.shape[0]),
        "tags_moved": moved,
        "keep": keep,
        "min_mentions": min_mentions,
        "hubness": hubness,
    }
    return replace(ts, embeddings=emb, bias=bias, provenance=prov)


def label_free_gate(
    ts: TagSystem, item_embeddings: F32, texts: Sequence[str], *, auto_share: float = 0.5
) -> TagSystem:
    """Set accept threshold and margin from score quantiles so about `auto_share` of items
    would be auto-accepted. Without labels precision cannot be targeted; `calibrate` can."""
    _, scores = ts.shortlist(item_embeddings, texts, k=2)
    top = scores[:, 0]
    margin = scores[:, 0] - scores[:, 1] if scores.shape[1] > 1 else np.ones_like(top)
    # both conditions must hold; split the share between them evenly
    q = 1 - np.sqrt(auto_share)
    gate = replace(
        ts.gate,
        accept_threshold=float(np.quantile(top, q)),
        min_margin=float(max(0.0, np.quantile(margin, q))),
        min_score=float(min(np.quantile(top, 0.01), np.quantile(top, q))),
    )
    return replace(ts, gate=gate)
