"""Top-k cosine shortlist: one matrix product per batch, argpartition instead of a full sort."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def unit(v: F32) -> F32:
    """Rows scaled to length 1 (zero rows stay zero): what `shortlist` expects."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    n[n == 0] = 1.0
    out: F32 = (v / n).astype(np.float32)
    return out


def shortlist(
    queries: F32,
    tag_embeddings: F32,
    k: int,
    *,
    bias: F32 | None = None,
    mentions: Sequence[Collection[int]] | None = None,
    boost: float = 0.0,
) -> tuple[I64, F32]:
    """Return (indices, scores), each (batch, k), best first.

    Both inputs must already be L2-normalised, so the dot product is the cosine. `bias`
    (one value per tag) is subtracted: tags close to everything ("hubs") stop crowding every
    shortlist. `mentions[i]` are the tags literally named in item i; each gains `boost`.
    """
    if queries.ndim != 2 or tag_embeddings.ndim != 2:
        raise ValueError("queries and tag_embeddings must be 2-D")
    scores = queries @ tag_embeddings.T
    if bias is not None:
        scores -= bias[None, :]
    return top_k(scores, k, mentions=mentions, boost=boost)


def top_k(
    scores: F32,
    k: int,
    *,
    mentions: Sequence[Collection[int]] | None = None,
    boost: float = 0.0,
) -> tuple[I64, F32]:
    """Best k columns per row of a (batch, n_tags) score matrix (modified in place)."""
    n_tags = scores.shape[1]
    k = max(1, min(k, n_tags))
    if mentions is not None and boost:
        for i, hits in enumerate(mentions):
            if hits:
                scores[i, list(hits)] += boost
    if k < n_tags:
        # the k largest sit at the end after partitioning at n - k (no negated copy)
        part = np.argpartition(scores, n_tags - k, axis=1)[:, n_tags - k :]
    else:
        part = np.broadcast_to(np.arange(n_tags), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    return idx, top
