"""Fitting the image scores onto the text scores' scale from labels (tagsys/fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tagsys.errors import TagSystemError
from tagsys.fusion import fit_fusion, platt


def _data(
    seed: int, informative: bool = True
) -> tuple[np.ndarray, np.ndarray, list[frozenset[int]]]:
    """Items with 30 tags; right tags score higher in both spaces, the image's cosines on a
    squeezed scale (0.2 + 0.25 × the text's), as CLIP's are."""
    rng = np.random.default_rng(seed)
    n, t = 400, 30
    gold = [frozenset(rng.choice(t, 2, replace=False).tolist()) for _ in range(n)]
    truth = np.zeros((n, t))
    for i, g in enumerate(gold):
        truth[i, list(g)] = 1.0
    latent = truth * 0.5 + rng.normal(0, 0.15, (n, t))
    text = (0.2 + latent).astype(np.float32)
    noise = latent if informative else rng.normal(0, 0.15, (n, t))
    image = (0.2 + 0.25 * noise).astype(np.float32)
    return text, image, gold


def test_platt_recovers_a_known_logistic() -> None:
    rng = np.random.default_rng(0)
    s = rng.uniform(-3, 3, 20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(2.0 * s - 1.0)))
    a, b = platt(s, y)
    assert a == pytest.approx(2.0, rel=0.1) and b == pytest.approx(-1.0, abs=0.1)
    with pytest.raises(TagSystemError, match="both"):
        platt(s, np.zeros(s.shape, dtype=bool))


def test_image_scores_are_put_on_the_text_scale() -> None:
    text, image, gold = _data(1)
    fit = fit_fusion(text, image, gold, np.ones(len(gold), dtype=bool))
    # image = 0.2 + 0.25 x (text - 0.2), so text = 4 x image - 0.6
    assert fit.informative and fit.scale == pytest.approx(4.0, rel=0.1)
    assert fit.shift == pytest.approx(-0.6, abs=0.08)
    assert fit.positives == 2 * len(gold) and fit.gain > 0.2


def test_an_image_space_without_signal_never_decides() -> None:
    text, image, gold = _data(2, informative=False)
    for seed in range(2, 8):  # a faint slope by chance, or none: never a floor under max
        text, image, gold = _data(seed, informative=False)
        fit = fit_fusion(text, image, gold, np.ones(len(gold), dtype=bool))
        assert not fit.informative and (fit.scale, fit.shift) == (0.0, -2.0), seed
        assert fit.gain < 0.02
    with pytest.raises(TagSystemError, match="no labelled item has an image"):
        fit_fusion(text, image, gold, np.zeros(len(gold), dtype=bool))
