"""Distil labelled decisions (gold labels or the LLM's choices) into the fast path.

A linear head on the frozen encoder embeddings: one weight vector and one bias per tag,
trained with numpy (softmax when every item has one label, one-vs-rest sigmoid otherwise).
It is stored in the tag system (`head.npz`) and replaces the cosine at scoring time, so the
gate, the service and `eval` run it unchanged. Tags without examples keep a head built from
their name embedding (scaled like the trained ones), so the vocabulary does not shrink.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tagsys.textfeat import Rows, TextFeatures

F32 = npt.NDArray[np.float32]
# fitting keeps the n-gram rows dense up to this size (KuaiRec level 1: 280 MB), beyond it
# rebuilds them chunk by chunk in every epoch (slower, bounded memory)
DENSE_TEXT_BYTES = 1 << 30


@dataclass(frozen=True)
class Head:
    weights: F32  # (n_tags, dim)
    bias: F32  # (n_tags,)
    kind: str  # "softmax" or "sigmoid"
    # the n-gram part: (n_tags, text.buckets) weights and how the text is hashed
    text_weights: F32 | None = None
    text: TextFeatures | None = None

    def __post_init__(self) -> None:
        if (self.text_weights is None) != (self.text is None):
            raise ValueError("a head's text weights and text features come together")
        if self.text_weights is not None and self.text is not None:
            want = (self.weights.shape[0], self.text.buckets)
            if self.text_weights.shape != want:
                raise ValueError(f"text weights {self.text_weights.shape}, expected {want}")

    def scores(self, emb: F32, texts: Sequence[str] | None = None) -> F32:
        """Probabilities in [0, 1]: what the gate thresholds compare against. `texts` (the
        items' texts, as embedded) are needed when the head reads n-grams."""
        logits = emb @ self.weights.T + self.bias
        if self.text_weights is not None and self.text is not None:
            if texts is None or len(texts) != len(emb):
                raise ValueError("this head reads the text: pass one text per embedding")
            logits = logits + self.text.transform(texts).matmul_t(self.text_weights)
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
    scale: float = 20.0,
    texts: Sequence[str] | None = None,
    text: TextFeatures | None = None,
    l2_text: float = 1e-4,
    progress: Callable[[int, int], None] | None = None,
) -> Head:
    """Full-batch Adam on cross-entropy, starting from, and pulled towards (`l2`), the
    zero-shot head `scale * tag_embeddings`: rare tags stay close to what their names say,
    tags without an example keep it exactly. With `text`, n-gram weights start at zero and
    are pulled back to it (`l2_text`: 1e-5 over-fits, 1e-3 under-fits KuaiRec)."""
    n, _ = emb.shape
    v = tag_embeddings.shape[0]
    multi = any(len(ls) != 1 for ls in labels)
    y = np.zeros((n, v), dtype=np.float32)
    for i, ls in enumerate(labels):
        for j in ls:
            y[i, j] = 1.0
    seen = y.sum(0) > 0
    # cosines live in a narrow band; the scale (a temperature) lets training start sensibly
    w0 = (tag_embeddings * scale).astype(np.float32)
    w = w0.copy()
    x: Rows | None = None
    x_dense: F32 | None = None
    if text is not None:
        if texts is None or len(texts) != n:
            raise ValueError("text features need one text per embedding")
        x = text.transform(texts)
        if n * text.buckets * 4 <= DENSE_TEXT_BYTES:  # fixed for every epoch: densify once
            x_dense = x.dense(0, n)
    u = np.zeros((v, text.buckets if text else 0), dtype=np.float32)

    def text_logits() -> F32 | float:
        if x_dense is not None:
            return x_dense @ u.T
        return x.matmul_t(u) if x is not None else 0.0

    def text_grad(g: F32) -> F32:
        if x_dense is not None:
            return x_dense.T @ g
        assert x is not None
        return x.t_matmul(g)

    mean_logit0 = (emb @ w0.T).mean(0)
    if multi:
        # start every tag at its base rate: sigmoid(mean logit) = share of items with it
        prior = np.clip((y.sum(0) + 0.5) / (n + 1.0), 1e-4, 0.5)
        b = (np.log(prior / (1 - prior)) - mean_logit0).astype(np.float32)
    else:
        b = np.zeros(v, dtype=np.float32)
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)
    m_b, v_b = np.zeros_like(b), np.zeros_like(b)
    m_u, v_u = np.zeros_like(u), np.zeros_like(u)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, epochs + 1):
        logits = emb @ w.T + b + text_logits()
        if multi:
            p = 1.0 / (1.0 + np.exp(-logits))
        else:
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
        g = (p - y) / n
        gw = g.T @ emb + l2 * (w - w0)
        gb = g.sum(0)
        gw[~seen] = 0.0  # tags with no example keep their zero-shot head
        gb[~seen] = 0.0
        steps = [(w, gw, m_w, v_w), (b, gb, m_b, v_b)]
        if x is not None:
            gu = text_grad(g).T + l2_text * u
            gu[~seen] = 0.0
            steps.append((u, gu, m_u, v_u))
        for param, grad, m, vv in steps:
            m *= beta1
            m += (1 - beta1) * grad
            vv *= beta2
            vv += (1 - beta2) * grad * grad
            param -= lr * (m / (1 - beta1**t)) / (np.sqrt(vv / (1 - beta2**t)) + eps)
        if progress and (t % 10 == 0 or t == epochs):
            progress(t, epochs)
    if not multi and (~seen).any() and seen.any():
        # unseen tags: place their mean logit at the low end of the trained tags', so they
        # rank when their name fits but do not win over tags with evidence
        mean_logit = (emb @ w.T + b + text_logits()).mean(0)
        target = float(np.quantile(mean_logit[seen], 0.1))
        b[~seen] = (target - (emb @ w[~seen].T).mean(0)).astype(np.float32)
    return Head(
        w.astype(np.float32),
        b.astype(np.float32),
        "sigmoid" if multi else "softmax",
        text_weights=u if x is not None else None,
        text=text,
    )
