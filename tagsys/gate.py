"""The gate: decide per item whether the encoder is sure enough or the LLM must decide.

The rule belongs to the tag-system version (its `GateConfig`), so every tag event can say
which thresholds decided it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt


class Decision(StrEnum):
    ENCODER = "encoder"  # confident: encoder tags go out directly
    LLM = "llm"  # uncertain: the LLM chose among the shortlist
    REVIEW = "review"  # uncertain and no LLM answer: encoder tags flagged needs_review


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of one tag-system version.

    An item is confident when its best score reaches `accept_threshold` (or that tag's own
    entry in `tag_thresholds`) and leads the runner-up by at least `min_margin`. Scores are
    cosines, minus the tag's bias when the tag system has one, plus `lexical_boost` when the
    tag is literally mentioned in the text (0 turns that off); with `lexical_stems` a mention
    may also be by word stems ("substitute" names "substitutions", tagsys/lexicon.py).
    """

    top_k: int = 10
    accept_threshold: float = 0.55
    min_margin: float = 0.04
    max_tags: int = 3
    min_score: float = 0.2
    tag_thresholds: dict[str, float] = field(default_factory=dict)
    lexical_boost: float = 0.0
    # Tag systems written before stem matching existed have no such key: they load with it
    # off (and `to_dict` leaves it out), so their behaviour and content hash stay the same.
    lexical_stems: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.max_tags < 1:
            raise ValueError("top_k and max_tags must be >= 1")
        if not -2.0 <= self.min_score <= self.accept_threshold <= 2.0:
            raise ValueError("need -2 <= min_score <= accept_threshold <= 2")
        if not 0.0 <= self.lexical_boost <= 1.0:
            raise ValueError("lexical_boost must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.lexical_stems:
            del d["lexical_stems"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("lexical_stems", False)
        return cls(**known)


@dataclass(frozen=True)
class GateResult:
    decision_hint: Decision  # ENCODER when confident, LLM when the LLM should be asked
    tags: list[tuple[int, float]]  # (tag index, score) the encoder would give, best first


def decide(
    idx: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float32],
    tag_ids: list[str],
    gate: GateConfig,
) -> GateResult:
    """Apply the gate to one item's shortlist (indices and scores, best first)."""
    top = float(scores[0])
    second = float(scores[1]) if len(scores) > 1 else -1.0
    threshold = gate.tag_thresholds.get(tag_ids[int(idx[0])], gate.accept_threshold)
    confident = top >= threshold and (top - second) >= gate.min_margin
    if confident:
        picked = [
            (int(i), float(s))
            for i, s in zip(idx[: gate.max_tags], scores[: gate.max_tags], strict=True)
            if s >= gate.tag_thresholds.get(tag_ids[int(i)], gate.accept_threshold)
        ]
        return GateResult(Decision.ENCODER, picked)
    fallback = [
        (int(i), float(s))
        for i, s in zip(idx[: gate.max_tags], scores[: gate.max_tags], strict=True)
        if s >= gate.min_score
    ]
    return GateResult(Decision.LLM, fallback)
