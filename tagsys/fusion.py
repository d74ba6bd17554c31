"""Fitting how image scores join text scores, from labelled items (`tagstream calibrate`).

Each space's score is Platt-scaled against the gold labels (one logistic regression of
"is this tag right for this item" on the score, Platt 1999): p = σ(a·s + b). The image
cosine is then put in text units, the text score with the same probability:
s_text = (a_i·cos + b_i − b_t) / a_t, i.e. `scale` = a_i / a_t and `shift` = (b_i − b_t) / a_t.
So the fused max compares like with like, and the gate's thresholds, fitted on text scores,
keep their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tagsys.errors import TagSystemError

F32 = npt.NDArray[np.float32]
MIN_GAIN = 0.02


@dataclass(frozen=True)
class FusionFit:
    scale: float
    shift: float
    pairs: int  # (item, tag) pairs it was fitted on
    positives: int
    # False: image scores tell right from wrong tags no better than chance here (log-loss
    # less than MIN_GAIN below the base rate's); the fit then sets the image's scores below
    # any text score (scale 0, shift -2), so it never decides. A near-flat Platt fit would
    # otherwise map every image score near the base rate's text score, and under `max`
    # that floor would outrank the text's own ordering of its weaker tags
    informative: bool = True
    gain: float = 0.0  # relative log-loss reduction of the image's fit over the base rate


def platt(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """(a, b) of p = σ(a·s + b), by Newton's method on the log-loss with Platt's smoothed
    targets (no infinite weights when the classes separate)."""
    pos = int(labels.sum())
    neg = int(labels.size - pos)
    if pos == 0 or neg == 0:
        raise TagSystemError("fitting needs both right and wrong (item, tag) pairs")
    t = np.where(labels, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    x = np.stack([scores, np.ones_like(scores)], axis=1)
    w = np.array([1.0, 0.0])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return float(w[0]), float(w[1])


def log_loss_gain(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_], a: float, b: float
) -> float:
    """How much the fit's log-loss is below the constant base-rate model's, relatively."""
    eps = 1e-12
    p = np.clip(1.0 / (1.0 + np.exp(-(a * scores + b))), eps, 1 - eps)
    fit = -np.mean(np.where(labels, np.log(p), np.log(1 - p)))
    base_p = float(labels.mean())
    base = -(base_p * np.log(base_p) + (1 - base_p) * np.log(1 - base_p))
    return float(1.0 - fit / base)


def fit_fusion(
    text: F32,
    image_cos: F32,
    gold: list[frozenset[int]],
    has_image: npt.NDArray[np.bool_],
    *,
    candidates: int = 50,
) -> FusionFit:
    """`scale`, `shift` for `ImageSpace` from items with an image: `text` and `image_cos` are
    (items, tags) score matrices; the pairs are each item's gold tags plus its `candidates`
    best tags in either space (the pairs a shortlist can hold; the rest say little)."""
    rows = np.flatnonzero(has_image)
    if rows.size == 0:
        raise TagSystemError("no labelled item has an image: nothing to fit the fusion on")
    n_tags = text.shape[1]
    k = min(candidates, n_tags)
    ts: list[float] = []
    im: list[float] = []
    ys: list[bool] = []
    for r in rows:
        cols = set(np.argsort(-text[r])[:k].tolist()) | set(np.argsort(-image_cos[r])[:k].tolist())
        cols |= set(gold[r])
        for c in sorted(cols):
            ts.append(float(text[r, c]))
            im.append(float(image_cos[r, c]))
            ys.append(c in gold[r])
    y = np.asarray(ys, dtype=bool)
    a_t, b_t = platt(np.asarray(ts), y)
    a_i, b_i = platt(np.asarray(im), y)
    if a_t <= 0:
        raise TagSystemError("text scores do not rise with correctness here: cannot fit")
    gain = round(log_loss_gain(np.asarray(im), y, a_i, b_i), 4)
    if a_i <= 0 or gain < MIN_GAIN:
        return FusionFit(0.0, -2.0, int(y.size), int(y.sum()), informative=False, gain=gain)
    return FusionFit(
        scale=round(a_i / a_t, 6),
        shift=round((b_i - b_t) / a_t, 6),
        pairs=int(y.size),
        positives=int(y.sum()),
        gain=gain,
    )
