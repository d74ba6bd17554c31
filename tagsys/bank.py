"""Expand tag vectors with their neighbours in a larger, same-domain tag vocabulary (a bank).

A category name such as 读书 or 人文 says little to a small encoder; the bank's fine tags
nearest to it (读书分享, 好书推荐, 人文历史, 古代文化…) say what items of that category are
about. Each tag's vector is mixed with the mean of its `k` nearest bank vectors. No labels
are used: the bank is an external vocabulary (TagGPT's 40k Kuaishou tags imported with
`import-tags`), so this is allowed in zero-shot evaluation. Measured in docs/QUALITY.md.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from tagsys.errors import EncoderMismatchError, TagSystemError
from tagsys.shortlist import shortlist, unit
from tagsys.tagsystem import TagSystem

F32 = npt.NDArray[np.float32]

BANK_K = 10
BANK_WEIGHT = 0.7  # share of the tag's own vector; the rest is its bank neighbours' mean


def bank_neighbours(embeddings: F32, bank: F32, k: int, chunk: int = 1024) -> npt.NDArray[np.int64]:
    """Indices of each row's `k` nearest bank rows (cosine, best first); chunked so a large
    vocabulary against a large bank stays within `chunk` x bank floats at a time."""
    starts = range(0, len(embeddings), chunk)
    rows = [shortlist(embeddings[s : s + chunk], bank, k)[0] for s in starts]
    return np.concatenate(rows) if rows else np.zeros((0, min(k, len(bank))), np.int64)


def check_mixable(ts: TagSystem, other: TagSystem, role: str) -> None:
    """`other` (a bank, a tree) can be mixed into `ts`'s vectors: same encoder, and vectors
    that still score (a distilled head does not read them)."""
    if other.encoder != ts.encoder or other.dim != ts.dim:
        raise EncoderMismatchError(
            f"{role} {other.version_id} was embedded with {other.encoder!r} ({other.dim} "
            f"dims), the tag system with {ts.encoder!r} ({ts.dim} dims); import the {role} "
            f"with --model {ts.encoder}"
        )
    if ts.head is not None:
        raise TagSystemError(
            f"tag system {ts.version_id} scores with a distilled head, which does not read "
            "the tag vectors; expand the tag system before distilling it"
        )


def expand_with_bank(
    ts: TagSystem, bank: TagSystem, *, k: int = BANK_K, weight: float = BANK_WEIGHT
) -> TagSystem:
    """A new tag system whose vectors are `weight` x own + (1 - weight) x bank neighbours'."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if not 0.0 <= weight <= 1.0:
        raise ValueError("weight must be in [0, 1]")
    check_mixable(ts, bank, "bank")
    if not bank.tags:
        raise TagSystemError(f"bank {bank.version_id} has no tags")
    nb = bank_neighbours(ts.embeddings, bank.embeddings, k)
    mean = unit(bank.embeddings[nb].mean(axis=1))
    emb = unit(weight * ts.embeddings + (1.0 - weight) * mean)
    prov = dict(ts.provenance)
    prov["bank"] = {"bank": bank.version_id, "k": int(nb.shape[1]), "weight": weight}
    return replace(ts, embeddings=emb, provenance=prov)
