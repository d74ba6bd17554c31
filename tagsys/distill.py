"""Distil labelled decisions (gold labels or the LLM's choices) into the fast path.

A linear head on the frozen encoder embeddings: one weight vector and one bias per tag,
trained with numpy (softmax when every item has one label, one-vs-rest sigmoid otherwise).
It is stored in the tag system (`head.npz`) and replaces the cosine at scoring time, so the
gate, the service and `eval` run it unchanged. Tags without examples keep a head built from
their name embedding (scaled like the trained ones), so the vocabulary does not shrink.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Head:
    weights: F32  # (n_tags, dim)
    bias: F32  # (n_tags,)
    kind: str  # "softmax" or "sigmoid"

    def scores(self, emb: F32) -> F32:
        """Probabilities in [0, 1]: what the gate thresholds compare against."""
        logits = emb @ self.weights.T + self.bias
        if self.kind == "softmax":
            logits = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            out: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
            return out
        sig: F32 = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return sig


def fit_head(
    emb: F32,
    labels: Sequence[Sequence[int]],
    tag_embeddings: F32,
    *,
    epochs: int = 300,
    lr: float = 0.05,
    l2: float = 1e-4,
    seed: int = 0,
) -> Head:
    """Full-batch Adam on cross-entropy; starts from the zero-shot tag embeddings."""
    n, _ = emb.shape
    v = tag_embeddings.shape[0]
    multi = any(len(ls) != 1 for ls in labels)
    y = np.zeros((n, v), dtype=np.float32)
    for i, ls in enumerate(labels):
        for j in ls:
            y[i, j] = 1.0
    seen = y.sum(0) > 0
    scale = 20.0  # cosines live in a narrow band; a temperature lets training start sensibly
    w = (tag_embeddings * scale).astype(np.float32)
    b = np.zeros(v, dtype=np.float32)
    if multi:
        prior = np.clip(y.mean(0), 1e-4, 1 - 1e-4)
        b = np.log(prior / (1 - prior)).astype(np.float32)
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)
    m_b, v_b = np.zeros_like(b), np.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    x, yy = emb[order], y[order]
    for t in range(1, epochs + 1):
        logits = x @ w.T + b
        if multi:
            p = 1.0 / (1.0 + np.exp(-logits))
        else:
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
        g = (p - yy) / n
        gw = g.T @ x + l2 * w
        gb = g.sum(0)
        gw[~seen] = 0.0  # tags with no example keep their zero-shot head
        gb[~seen] = 0.0
        for param, grad, m, vv in ((w, gw, m_w, v_w), (b, gb, m_b, v_b)):
            m *= beta1
            m += (1 - beta1) * grad
            vv *= beta2
            vv += (1 - beta2) * grad * grad
            param -= lr * (m / (1 - beta1**t)) / (np.sqrt(vv / (1 - beta2**t)) + eps)
    if (~seen).any() and seen.any():
        # unseen tags: a bias at the low end of the trained ones, so they rank but rarely win
        b[~seen] = np.float32(np.quantile(b[seen], 0.1))
    return Head(w.astype(np.float32), b.astype(np.float32), "sigmoid" if multi else "softmax")
